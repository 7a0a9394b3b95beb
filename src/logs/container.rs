//! Container runtimes' log files (`format: cri` or `docker`): each line is unwrapped into the
//! stream it came from, the runtime's timestamp and the app's own text, and whether the runtime
//! cut that text (a line longer than its buffer, 16 KiB for containerd, CRI-O and Docker) so
//! the next line of the same stream continues it. [`super::multiline::Assembler`] joins the
//! pieces.
//!
//! - CRI (kubelet's `/var/log/pods/…/0.log`):
//!   `2016-10-06T00:17:09.669794202Z stdout F the message` — `P` for a partial piece, `F` for the
//!   last (the tag field may hold more tags after a `:`, the first is the one that counts).
//! - Docker's json-file driver: `{"log":"the message\n","stream":"stdout","time":"…"}` — a
//!   `log` without its trailing `\n` is a partial piece.

use std::borrow::Cow;

use serde::Deserialize;

use crate::config::logs::Container;
use crate::lifecycle::capture::Stream;

/// One runtime line unwrapped.
#[derive(Debug, PartialEq, Eq)]
pub struct Unwrapped<'a> {
    pub stream: Stream,
    /// The runtime's RFC 3339 timestamp, as written.
    pub time: Cow<'a, str>,
    /// More of this text follows on the next line of the same stream.
    pub partial: bool,
    pub text: Cow<'a, [u8]>,
}

/// The app's text in one runtime line; None when the line is not in the runtime's format
/// (shipped then as it is, so nothing is lost to a damaged line).
pub fn unwrap(format: Container, line: &[u8]) -> Option<Unwrapped<'_>> {
    match format {
        Container::Cri => cri(line),
        Container::Docker => docker(line),
    }
}

fn stream(s: &[u8]) -> Option<Stream> {
    match s {
        b"stdout" => Some(Stream::Stdout),
        b"stderr" => Some(Stream::Stderr),
        _ => None,
    }
}

fn cri(line: &[u8]) -> Option<Unwrapped<'_>> {
    let mut fields = line.splitn(4, |&b| b == b' ');
    let time = fields.next().filter(|t| rfc3339(t))?;
    // ASCII: checked just above.
    let time = std::str::from_utf8(time).ok()?;
    let stream = stream(fields.next()?)?;
    let tags = fields.next()?;
    let partial = match tags.split(|&b| b == b':').next()? {
        b"P" => true,
        b"F" => false,
        _ => return None,
    };
    // An empty message may come without the space before it.
    let text = fields.next().unwrap_or_default();
    Some(Unwrapped {
        stream,
        time: Cow::Borrowed(time),
        partial,
        text: Cow::Borrowed(text),
    })
}

/// Whether `t` is an RFC 3339 date-time as the runtimes write it (Go's `RFC3339Nano`):
/// `2016-10-06T00:17:09.669794202Z`, or with an offset (`+02:00`) instead of `Z`, and a date
/// that exists (not 2016-02-31). A line whose first word is not a time is not a CRI line,
/// whatever follows it.
fn rfc3339(t: &[u8]) -> bool {
    use time::format_description::well_known::Rfc3339;
    std::str::from_utf8(t).is_ok_and(|t| time::OffsetDateTime::parse(t, &Rfc3339).is_ok())
}

#[derive(Deserialize)]
struct DockerLine<'a> {
    #[serde(borrow)]
    log: Cow<'a, str>,
    #[serde(borrow)]
    stream: Cow<'a, str>,
    #[serde(borrow, default)]
    time: Cow<'a, str>,
}

fn docker(line: &[u8]) -> Option<Unwrapped<'_>> {
    let d: DockerLine<'_> = serde_json::from_slice(line).ok()?;
    let stream = stream(d.stream.as_bytes())?;
    let (text, partial) = match d.log {
        Cow::Borrowed(s) => match s.strip_suffix('\n') {
            Some(t) => (
                Cow::Borrowed(t.strip_suffix('\r').unwrap_or(t).as_bytes()),
                false,
            ),
            None => (Cow::Borrowed(s.as_bytes()), true),
        },
        Cow::Owned(mut s) => {
            let partial = !s.ends_with('\n');
            if !partial {
                s.pop();
                if s.ends_with('\r') {
                    s.pop();
                }
            }
            (Cow::Owned(s.into_bytes()), partial)
        }
    };
    Some(Unwrapped {
        stream,
        time: d.time,
        partial,
        text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_lines_unwrap_with_their_tag() {
        let u = unwrap(
            Container::Cri,
            b"2016-10-06T00:17:09.669794202Z stderr P part one",
        )
        .unwrap();
        assert_eq!(u.stream, Stream::Stderr);
        assert_eq!(u.time, "2016-10-06T00:17:09.669794202Z");
        assert!(u.partial);
        assert_eq!(&*u.text, b"part one");
        let u = unwrap(Container::Cri, b"2016-10-06T00:17:09Z stdout F:x ").unwrap();
        assert!(!u.partial);
        assert_eq!(&*u.text, b"");
        let u = unwrap(Container::Cri, b"2016-10-06T00:17:09Z stdout F").unwrap();
        assert_eq!(&*u.text, b"");
        assert!(unwrap(Container::Cri, b"just a line").is_none());
        assert!(unwrap(Container::Cri, b"2016 stdin F x").is_none());
    }

    #[test]
    fn a_cri_line_whose_time_is_not_rfc_3339_is_not_a_cri_line() {
        for ok in [
            "2016-10-06T00:17:09.669794202Z",
            "2016-10-06T00:17:09Z",
            "2021-01-01T10:00:00.123+01:00",
            "2016-12-31T23:59:60Z",
        ] {
            let line = format!("{ok} stdout F text");
            assert!(unwrap(Container::Cri, line.as_bytes()).is_some(), "{ok}");
        }
        for bad in [
            "yesterday",
            "2016-10-06",
            "2016-10-06 00:17:09Z",
            "2016-13-06T00:17:09Z",
            "2016-10-00T00:17:09Z",
            "2016-10-06T24:17:09Z",
            "2016-10-06T00:17:09.Z",
            "2016-10-06T00:17:09",
            "2016-10-06T00:17:09+0100",
            "2016-10-06T00:17:09Zjunk",
            "2016-02-31T00:17:09Z",
            "２016-10-06T00:17:09Z",
        ] {
            let line = format!("{bad} stdout F text");
            assert!(unwrap(Container::Cri, line.as_bytes()).is_none(), "{bad}");
        }
    }

    #[test]
    fn docker_lines_unwrap_and_a_missing_newline_is_partial() {
        let u = unwrap(
            Container::Docker,
            br#"{"log":"hello \"you\"\n","stream":"stdout","time":"2019-01-01T11:11:11.111111111Z"}"#,
        )
        .unwrap();
        assert_eq!(&*u.text, br#"hello "you""#);
        assert!(!u.partial);
        assert_eq!(u.time, "2019-01-01T11:11:11.111111111Z");
        let u = unwrap(
            Container::Docker,
            br#"{"log":"cut","stream":"stderr","time":"t"}"#,
        )
        .unwrap();
        assert!(u.partial);
        assert_eq!(u.stream, Stream::Stderr);
        assert!(unwrap(Container::Docker, b"{\"log\":1}").is_none());
    }
}
