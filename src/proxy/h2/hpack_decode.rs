//! HPACK decoding (RFC 7541) of the request header blocks our HTTP/2 server reads: a block's
//! bytes come in from `conn.rs` (HEADERS and CONTINUATION fragments joined), each field goes
//! out to a callback (`BlockReader::field` in `hpack.rs`), and the connection's dynamic table
//! stays here between blocks.
//!
//! Hand written because the crates at hand cost too much per string: `loona-hpack` 0.4 builds
//! a new Huffman decoder (a `HashMap` of `HashMap`s of all 257 codes) for every Huffman-coded
//! string and then walks it bit by bit with two hash lookups per bit (68 allocations for an
//! h2c GET of `/hello` against ~5, and a 16 KiB block of 1-byte Huffman strings is thousands
//! of table builds: CPU amplification), and h2's fast decoder is not public API. Here the
//! Huffman decoder is a table built once per process (a state machine over the code tree's
//! 256 internal nodes that takes 4 bits at a time, as nghttp2's and h2's are), Huffman-coded
//! strings are decoded into one scratch buffer the decoder keeps, raw strings are passed on
//! borrowed from the block, and a dynamic table entry is its value's allocation plus its name:
//! a static table name, or a literal name as one `Arc<[u8]>` that every later entry naming it
//! by index shares.
//!
//! The bound that holds: the work per block is proportional to the block's length. Every byte
//! copied (into the scratch or into the table) is a byte of the block or one Huffman-decoded
//! from it (at most 8 bytes per 5: the shortest code is 5 bits), each literal's own name and
//! value are copied into the table at most once, a name taken from a table costs a pointer copy whatever its
//! length (so `7e 00` repeated after one long literal name is 2 bytes of block for O(1) work,
//! not a copy of the name), and each entry is evicted at most once after it was inserted
//! (plus those the table held before the block: at most its size / 32, 128 for 4096 bytes).
//! That bounds the decoder, not what it hands out: one byte (an indexed field) can name a
//! 4 KiB entry, so the callback must stop copying at its own limit, as `BlockReader::field`
//! does at the header list size (it counts a field before it copies any of it).
//!
//! Any error leaves the table as it is (possibly half updated): the connection is closed with
//! COMPRESSION_ERROR (RFC 9113 §4.3), so nothing decodes with it again.

use std::collections::VecDeque;
use std::sync::{Arc, LazyLock};

/// What makes a header block undecodable (the connection's COMPRESSION_ERROR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(super) enum DecodeError {
    #[error("header block ends inside a representation")]
    Truncated,
    #[error("integer longer than 5 bytes")]
    IntegerTooLong,
    #[error("index 0")]
    IndexZero,
    #[error("index {0} past the static and dynamic tables")]
    IndexOutOfRange(usize),
    #[error("huffman-coded string holds the EOS symbol")]
    HuffmanEos,
    #[error("huffman padding longer than 7 bits or not all ones")]
    HuffmanPadding,
    #[error("dynamic table size update to {size} above the {max} allowed")]
    SizeUpdateTooLarge { size: usize, max: usize },
    #[error("dynamic table size update after a field")]
    SizeUpdateAfterField,
}

/// The static table (RFC 7541 Appendix A), index 1 first.
pub(super) const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// The bit length of each symbol's Huffman code (RFC 7541 Appendix B; 256 is EOS). The code is
/// canonical: codes are assigned in order of (length, symbol), each the previous one plus one
/// shifted to its length, which gives exactly the Appendix's codes (`huffman_code` rebuilds
/// them; tests check it against the Appendix's own examples and against `loona-hpack`).
const HUFFMAN_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, // 0..16
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, // 16..32
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, // ' '..'0'
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, // '0'..'@'
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, // '@'..'P'
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, // 'P'..'`'
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, // '`'..'p'
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, // 'p'..128
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, // 128..144
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, // 144..160
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, // 160..176
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, // 176..192
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, // 192..208
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, // 208..224
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, // 224..240
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, // 240..256
    30, // EOS
];

/// The EOS symbol (RFC 7541 §5.2): never in a string.
const EOS: usize = 256;

/// Every symbol's (code, bit length), the code right-aligned: the canonical code of
/// [`HUFFMAN_LENGTHS`].
fn huffman_code() -> [(u32, u8); 257] {
    let mut order: Vec<usize> = (0..257).collect();
    order.sort_by_key(|&s| (HUFFMAN_LENGTHS[s], s));
    let mut codes = [(0u32, 0u8); 257];
    let mut code = 0u32;
    let mut len = HUFFMAN_LENGTHS[order[0]];
    for (i, &s) in order.iter().enumerate() {
        if i > 0 {
            code = (code + 1) << (HUFFMAN_LENGTHS[s] - len);
            len = HUFFMAN_LENGTHS[s];
        }
        codes[s] = (code, len);
    }
    codes
}

/// One step of the Huffman state machine: from an internal node of the code tree, 4 bits.
#[derive(Clone, Copy, Default)]
struct Step {
    /// The internal node the 4 bits end at (0, the root, after a symbol ended exactly there).
    next: u8,
    /// The symbol that ended within the 4 bits (the shortest code is 5 bits: at most one).
    byte: u8,
    /// [`EMITS`] and [`FAILS`].
    flags: u8,
}

const EMITS: u8 = 1;
/// The 4 bits complete EOS.
const FAILS: u8 = 2;

/// The Huffman decoder's tables, built once per process.
struct Huffman {
    /// Per internal node, per 4 bits.
    steps: Box<[[Step; 16]; 256]>,
    /// Per internal node: a string may end there (the bits since the last symbol are at
    /// most 7 and all ones: EOS's prefix as padding, §5.2).
    may_end: [bool; 256],
}

static HUFFMAN: LazyLock<Huffman> = LazyLock::new(build_huffman);

fn build_huffman() -> Huffman {
    // The code tree: per internal node its two children, a child either an internal node
    // (index) or a symbol (`LEAF | symbol`).
    const LEAF: u16 = 0x8000;
    const NONE: u16 = u16::MAX;
    let mut nodes: Vec<[u16; 2]> = vec![[NONE; 2]];
    // Per internal node: its depth and whether the path to it is all ones.
    let mut depth = vec![0u8];
    let mut ones = vec![true];
    for (sym, &(code, len)) in huffman_code().iter().enumerate() {
        let mut node = 0usize;
        for i in (0..len).rev() {
            let bit = ((code >> i) & 1) as usize;
            if i == 0 {
                nodes[node][bit] = LEAF | sym as u16;
            } else {
                if nodes[node][bit] == NONE {
                    nodes.push([NONE; 2]);
                    depth.push(depth[node] + 1);
                    ones.push(ones[node] && bit == 1);
                    nodes[node][bit] = (nodes.len() - 1) as u16;
                }
                node = usize::from(nodes[node][bit]);
            }
        }
    }
    assert_eq!(
        nodes.len(),
        256,
        "a complete code of 257 symbols has 256 internal nodes"
    );
    let mut steps = Box::new([[Step::default(); 16]; 256]);
    let mut may_end = [false; 256];
    for state in 0..256 {
        may_end[state] = ones[state] && depth[state] <= 7;
        for nibble in 0..16u8 {
            let mut node = state;
            let mut step = Step::default();
            for i in (0..4).rev() {
                let child = nodes[node][usize::from((nibble >> i) & 1)];
                // NONE has the LEAF bit set: a missing child (a mistyped code length) would
                // decode as byte 0xff.
                assert_ne!(child, NONE, "the Huffman code tree has a missing child");
                if child & LEAF != 0 {
                    let sym = usize::from(child & !LEAF);
                    if sym == EOS {
                        step.flags |= FAILS;
                    } else {
                        step.flags |= EMITS;
                        step.byte = sym as u8;
                    }
                    node = 0;
                } else {
                    node = usize::from(child);
                }
            }
            step.next = node as u8;
            steps[state][usize::from(nibble)] = step;
        }
    }
    Huffman { steps, may_end }
}

/// Decodes a Huffman-coded string (§5.2), appending it to `out`.
fn huffman_decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
    let h = &*HUFFMAN;
    // At most 8 bits per 5: the shortest code.
    out.reserve(src.len() * 8 / 5 + 1);
    let mut state = 0usize;
    for &b in src {
        for nibble in [b >> 4, b & 0x0f] {
            let step = h.steps[state][usize::from(nibble)];
            if step.flags & FAILS != 0 {
                return Err(DecodeError::HuffmanEos);
            }
            if step.flags & EMITS != 0 {
                out.push(step.byte);
            }
            state = usize::from(step.next);
        }
    }
    if h.may_end[state] {
        Ok(())
    } else {
        Err(DecodeError::HuffmanPadding)
    }
}

/// An integer with an `prefix`-bit prefix (§5.1) at `block[pos]` (which exists): the value
/// and the position after it. At most 4 bytes after the prefix (the value is under 2^28 plus
/// the prefix's maximum), as h2 and `loona-hpack` allow.
fn integer(block: &[u8], pos: usize, prefix: u8) -> Result<(usize, usize), DecodeError> {
    let max = (1usize << prefix) - 1;
    let mut value = usize::from(block[pos]) & max;
    let mut pos = pos + 1;
    if value < max {
        return Ok((value, pos));
    }
    for shift in [0, 7, 14, 21] {
        let Some(&b) = block.get(pos) else {
            return Err(DecodeError::Truncated);
        };
        pos += 1;
        value += usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok((value, pos));
        }
    }
    Err(DecodeError::IntegerTooLong)
}

/// Where a decoded string is: in the block (raw) or in the decoder's scratch (Huffman-coded).
#[derive(Clone, Copy)]
struct Str {
    scratch: bool,
    start: usize,
    end: usize,
}

impl Str {
    fn get<'a>(self, block: &'a [u8], scratch: &'a [u8]) -> &'a [u8] {
        let from = if self.scratch { scratch } else { block };
        &from[self.start..self.end]
    }
}

/// A string literal (§5.2) at `block[pos]`: where it is and the position after it.
fn string(block: &[u8], pos: usize, scratch: &mut Vec<u8>) -> Result<(Str, usize), DecodeError> {
    let Some(&first) = block.get(pos) else {
        return Err(DecodeError::Truncated);
    };
    let (len, pos) = integer(block, pos, 7)?;
    let end = pos.checked_add(len).ok_or(DecodeError::Truncated)?;
    let Some(src) = block.get(pos..end) else {
        return Err(DecodeError::Truncated);
    };
    if first & 0x80 == 0 {
        return Ok((
            Str {
                scratch: false,
                start: pos,
                end,
            },
            end,
        ));
    }
    let start = scratch.len();
    huffman_decode(src, scratch)?;
    Ok((
        Str {
            scratch: true,
            start,
            end: scratch.len(),
        },
        end,
    ))
}

/// A dynamic table entry's name: a static table name, or a name that came as a literal, shared
/// by every entry that names it by index (inserting one of those clones a pointer, never the
/// name's bytes).
#[derive(Clone)]
enum Name {
    Static(&'static [u8]),
    Shared(Arc<[u8]>),
}

impl Name {
    fn bytes(&self) -> &[u8] {
        match self {
            Name::Static(name) => name,
            Name::Shared(name) => name,
        }
    }
}

/// A dynamic table entry: its name (shared) and its value (its own).
struct Entry {
    name: Name,
    value: Box<[u8]>,
}

impl Entry {
    /// Its size as §4.1 counts it.
    fn size(&self) -> usize {
        self.name.bytes().len() + self.value.len() + 32
    }

    fn field(&self) -> (&[u8], &[u8]) {
        (self.name.bytes(), &self.value)
    }
}

/// The dynamic table (§2.3.2): newest entry first, at most `max` bytes as §4.1 counts them.
struct Table {
    entries: VecDeque<Entry>,
    size: usize,
    max: usize,
}

impl Table {
    /// The field at `index` of the static and dynamic tables' joint index space (§2.3.3).
    fn get(&self, index: usize) -> Result<(&[u8], &[u8]), DecodeError> {
        match index {
            0 => Err(DecodeError::IndexZero),
            1..=61 => {
                let (name, value) = STATIC_TABLE[index - 1];
                Ok((name.as_bytes(), value.as_bytes()))
            }
            _ => self
                .entries
                .get(index - 62)
                .map(Entry::field)
                .ok_or(DecodeError::IndexOutOfRange(index)),
        }
    }

    /// The name at `index` (valid: `get` said so), to share with a new entry.
    fn name(&self, index: usize) -> Name {
        match index {
            1..=61 => Name::Static(STATIC_TABLE[index - 1].0.as_bytes()),
            _ => self.entries[index - 62].name.clone(),
        }
    }

    fn evict_to(&mut self, max: usize) {
        while self.size > max {
            let Some(old) = self.entries.pop_back() else {
                break;
            };
            self.size -= old.size();
        }
    }

    /// Adds an entry, evicting the oldest ones for room; one larger than the table empties
    /// it (§4.4).
    fn insert(&mut self, entry: Entry) {
        let size = entry.size();
        if size > self.max {
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.max - size);
        self.size += size;
        self.entries.push_front(entry);
    }

    fn resize(&mut self, max: usize) {
        self.max = max;
        self.evict_to(max);
    }
}

/// The Huffman scratch kept between blocks: a block that decodes more gets it freed after.
const SCRATCH_KEPT: usize = 4096;

/// A connection's HPACK decoder: its dynamic table and a scratch buffer for Huffman-coded
/// strings.
pub(super) struct Decoder {
    table: Table,
    /// The largest table size a size update may set (what we announced).
    max_allowed: usize,
    scratch: Vec<u8>,
}

impl Decoder {
    /// A decoder whose table starts at, and may never grow past, `max_table_size` bytes.
    pub fn new(max_table_size: usize) -> Self {
        Decoder {
            table: Table {
                entries: VecDeque::new(),
                size: 0,
                max: max_table_size,
            },
            max_allowed: max_table_size,
            scratch: Vec::new(),
        }
    }

    /// Decodes a whole header block, calling `field(name, value, never_indexed)` for each
    /// field in order. The slices live for the call only (they may be the block's, the
    /// tables' or the scratch buffer's bytes).
    pub fn decode_with_cb(
        &mut self,
        block: &[u8],
        field: impl FnMut(&[u8], &[u8], bool),
    ) -> Result<(), DecodeError> {
        let result = self.decode(block, field);
        self.scratch.clear();
        if self.scratch.capacity() > SCRATCH_KEPT {
            self.scratch = Vec::new();
        }
        result
    }

    fn decode(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(&[u8], &[u8], bool),
    ) -> Result<(), DecodeError> {
        let mut pos = 0;
        let mut fields_seen = false;
        while let Some(&first) = block.get(pos) {
            if first & 0x80 != 0 {
                // Indexed field (§6.1).
                let (index, next) = integer(block, pos, 7)?;
                pos = next;
                let (name, value) = self.table.get(index)?;
                field(name, value, false);
                fields_seen = true;
            } else if first & 0xe0 == 0x20 {
                // Dynamic table size update (§6.3): only before the block's first field
                // (§4.2).
                if fields_seen {
                    return Err(DecodeError::SizeUpdateAfterField);
                }
                let (size, next) = integer(block, pos, 5)?;
                pos = next;
                if size > self.max_allowed {
                    return Err(DecodeError::SizeUpdateTooLarge {
                        size,
                        max: self.max_allowed,
                    });
                }
                self.table.resize(size);
            } else {
                // A literal (§6.2): with incremental indexing (01), without indexing (0000)
                // or never indexed (0001).
                let indexing = first & 0x40 != 0;
                let never = !indexing && first & 0x10 != 0;
                let (index, next) = integer(block, pos, if indexing { 6 } else { 4 })?;
                pos = next;
                self.scratch.clear();
                let name = if index == 0 {
                    let (name, next) = string(block, pos, &mut self.scratch)?;
                    pos = next;
                    Some(name)
                } else {
                    // Checked before the value is read: an error is an error either way.
                    self.table.get(index)?;
                    None
                };
                let (value, next) = string(block, pos, &mut self.scratch)?;
                pos = next;
                let value = value.get(block, &self.scratch);
                match name {
                    Some(name) => field(name.get(block, &self.scratch), value, never),
                    None => field(self.table.get(index)?.0, value, never),
                }
                if indexing {
                    // A literal name is copied once, from the block (or the scratch its
                    // Huffman code decoded into); a table's name is shared, not copied.
                    let name = match name {
                        Some(name) => Name::Shared(name.get(block, &self.scratch).into()),
                        None => self.table.name(index),
                    };
                    self.table.insert(Entry {
                        name,
                        value: value.into(),
                    });
                }
                fields_seen = true;
            }
        }
        Ok(())
    }

    /// Where each dynamic table entry's name lives, newest first: entries sharing a name
    /// give one address (the tests' check that a name from the table is not copied).
    #[cfg(test)]
    fn name_addresses(&self) -> Vec<*const u8> {
        self.table
            .entries
            .iter()
            .map(|e| e.name.bytes().as_ptr())
            .collect()
    }

    /// Whether each dynamic table entry's name is a static table name, newest first.
    #[cfg(test)]
    fn static_names(&self) -> Vec<bool> {
        let is_static = |e: &Entry| matches!(e.name, Name::Static(_));
        self.table.entries.iter().map(is_static).collect()
    }

    /// The dynamic table's entries, newest first, and its size.
    #[cfg(test)]
    fn table(&self) -> (Vec<(String, String)>, usize) {
        let entries = self
            .table
            .entries
            .iter()
            .map(|e| {
                let (n, v) = e.field();
                (
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect();
        (entries, self.table.size)
    }
}

#[cfg(test)]
#[path = "hpack_decode_tests.rs"]
mod tests;
