//! Limits on the YAML files Outrigger reads (the config file, `bridge.resources` component and
//! Subscription files, endpoint files), so that a malicious or broken file is refused fast and
//! with bounded memory instead of being parsed at any cost.
//!
//! Three limits, checked before any YAML is deserialized:
//! - **size**: at most [`MAX_FILE_BYTES`]; a longer file is not even read whole (a 111 MB config
//!   took 4.9 GB and tens of seconds to refuse);
//! - **nesting**: at most [`MAX_NESTING`] levels of mappings and sequences. serde_norway stops
//!   at 128 levels, but its scanner first spends time quadratic in the depth of flow
//!   collections (`[[[[…`): a 200 KB file took 19 s (54 s in a debug build) to be refused. The
//!   check pulls yaml-rust2's events one at a time and stops at the first level too deep, so
//!   it costs what the text up to that point costs;
//! - **nodes**: at most [`MAX_NODES`] keys, scalars and collections (memory grows with them).

use std::io::Read;
use std::path::Path;

use yaml_rust2::parser::{Event, Parser};

/// The largest YAML file read: 1 MiB, what a Kubernetes ConfigMap or Secret can hold. Real
/// configs are a few KiB; parsing costs roughly 100 bytes of memory per byte of YAML.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The deepest nesting of mappings and sequences accepted. Outrigger's own config nests
/// about 6 levels; component metadata a few more.
pub const MAX_NESTING: usize = 32;

/// The most nodes (keys, scalars, mappings, sequences) in one file. A line of YAML is one or
/// two; 1 MiB of realistic YAML is below 100,000. Each node costs a few hundred bytes while a
/// file is checked (its value, its position, its path for error messages): 1 MiB of
/// `[[[…]]]` units 30 deep (500,000 nodes) took 340 MB to refuse before this limit.
pub const MAX_NODES: usize = 100_000;

/// Reads a YAML file of at most [`MAX_FILE_BYTES`]; a longer one is refused without reading
/// it whole. The error says why, naming the limit (the caller names the file).
pub fn read(path: &Path) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    // One byte more than allowed tells a file at the limit from a longer one (and a FIFO or
    // a device is never read without end).
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large());
    }
    Ok(text)
}

/// The message for a file over [`MAX_FILE_BYTES`].
pub fn too_large() -> String {
    format!(
        "the file is larger than {} MiB, the limit for YAML files Outrigger reads",
        MAX_FILE_BYTES >> 20
    )
}

/// Where YAML text goes past [`MAX_NESTING`] or [`MAX_NODES`]: the line and column (from 1)
/// of the first node past the limit, and the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TooLarge {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Checks that `text` nests mappings and sequences at most [`MAX_NESTING`] deep and has at
/// most [`MAX_NODES`] nodes. A syntax error is not this check's business: it stops there and
/// lets the real parser report it.
pub fn check_shape(text: &str) -> Result<(), TooLarge> {
    let at = |mark: yaml_rust2::scanner::Marker, message: String| TooLarge {
        line: mark.line(),
        // yaml-rust2 counts columns from 0.
        column: mark.col() + 1,
        message,
    };
    let too_deep = |mark| {
        at(
            mark,
            format!(
                "mappings and sequences nest more than {MAX_NESTING} levels deep here; that is the limit"
            ),
        )
    };
    let mut parser = Parser::new_from_str(text);
    let mut depth = 0usize;
    let mut nodes = 0usize;
    loop {
        let (event, mark) = match parser.next_token() {
            Ok(next) => next,
            // The scanner reads flow collections ahead, up to 255 levels: past them it stops
            // with this (before a single event of the deep part was seen).
            Err(e) if e.info() == "recursion limit exceeded" => return Err(too_deep(*e.marker())),
            Err(_) => return Ok(()),
        };
        if matches!(
            event,
            Event::MappingStart(..)
                | Event::SequenceStart(..)
                | Event::Scalar(..)
                | Event::Alias(..)
        ) {
            nodes += 1;
            if nodes > MAX_NODES {
                return Err(at(
                    mark,
                    format!(
                        "more than {MAX_NODES} keys and values; that is the limit for one file"
                    ),
                ));
            }
        }
        match event {
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(too_deep(mark));
                }
            }
            Event::MappingEnd | Event::SequenceEnd => depth = depth.saturating_sub(1),
            Event::StreamEnd => return Ok(()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_or_wide_documents_are_refused_at_the_first_node_past_the_limit() {
        let deep = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        let e = check_shape(&deep).unwrap_err();
        assert_eq!(e.line, 1, "{e:?}");
        let mut block = String::new();
        for i in 0..100 {
            block.push_str(&"  ".repeat(i));
            block.push_str("k:\n");
        }
        let e = check_shape(&block).unwrap_err();
        assert_eq!(e.line, MAX_NESTING + 1, "{e:?}");
        let ok = format!("a: {}{}\n", "{b: ".repeat(31), "}".repeat(31));
        assert_eq!(check_shape(&ok), Ok(()));
        let wide = format!("a: [{}]\n", "1, ".repeat(MAX_NODES));
        let e = check_shape(&wide).unwrap_err();
        assert!(
            e.message.starts_with("more than 100000 keys and values"),
            "{e:?}"
        );
        // Syntax errors are left to the parser that reports them.
        assert_eq!(check_shape("a: [\n"), Ok(()));
    }

    #[test]
    fn a_file_over_the_limit_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("at.yaml");
        std::fs::write(&at, vec![b'#'; MAX_FILE_BYTES as usize]).unwrap();
        assert_eq!(read(&at).unwrap().len() as u64, MAX_FILE_BYTES);
        let over = dir.path().join("over.yaml");
        std::fs::write(&over, vec![b'#'; MAX_FILE_BYTES as usize + 1]).unwrap();
        assert_eq!(read(&over).unwrap_err(), too_large());
    }
}
