//! Hand-written JSON output for the per-request paths (access log lines, OTLP spans): plain
//! byte pushes into a reused buffer. `serde_json` with derived or `Value` types cost several
//! times as many instructions per line, measured with callgrind (docs/BENCHMARKS.md).

pub fn number(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// The low `digits * 4` bits of `v` as lowercase hex (trace and span ids).
pub fn hex(out: &mut Vec<u8>, v: u128, digits: usize) {
    let mut b = [0u8; 32];
    crate::telemetry::trace::hex_into(&mut b[..digits], v);
    out.extend_from_slice(&b[..digits]);
}

/// A JSON string; the common case (nothing to escape) is a plain copy.
pub fn string(out: &mut Vec<u8>, s: &str) {
    if s.bytes()
        .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b != 0x7f)
    {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

pub fn opt_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}
