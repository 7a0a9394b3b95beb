//! `bindings.postgresql` (alias `bindings.postgres`): SQL through an output binding, as daprd's
//! (components-contrib `bindings/postgres`). Operations:
//! - `exec`: metadata `sql` and optional `params` (a JSON array, `$1`, `$2`… in the SQL); answers
//!   no data and the metadata `rows-affected`;
//! - `query`: the same, answering the rows as a JSON array of arrays of column values (pgx's
//!   `rows.Values()` marshalled by Go: numbers, strings, booleans, JSON as JSON, `bytea` as
//!   base64, timestamps and dates as RFC 3339 in UTC, arrays as arrays, `uuid` as 16 numbers;
//!   `numeric` and JSON numbers digit for digit; other binary types as base64), at most
//!   [`MAX_QUERY_RESULT_BYTES`] of it;
//! - `close`: closes the pool; later calls fail ("component is closed"), as daprd's.
//!
//! Both answers carry `operation`, `sql`, `start-time`, `end-time` (RFC 3339, nanoseconds) and
//! `duration` (Go's spelling, `1.234ms`). Requests come from [`super::bindings::OutputBinding`];
//! they leave on the same bounded deadpool as `state.postgresql` ([`super::state_postgresql::pool_recycled`]:
//! `connectionString`, `timeout`, `maxConns`; nothing connects at start, a database that is down
//! fails each call and is used again once it is back).
//!
//! Parameters are sent in PostgreSQL's text format and typed by the server, as pgx sends the
//! `[]any` daprd decodes them into: `1`, `"a"`, `true`, `null` fit any column whose type reads
//! them; objects and arrays go as their JSON text (fit for `json`/`jsonb` columns).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use deadpool_postgres::Pool;
use serde_json::value::RawValue;
use tokio_postgres::types::{FromSql, IsNull, Kind, ToSql, Type, to_sql_checked};

use super::bindings::BindingResponse;
use super::components::Component;
use super::state_postgresql::{chain, pool_recycled};

/// A `bindings.postgresql` component.
pub struct PostgresBinding {
    pool: Pool,
    timeout: Duration,
    closed: AtomicBool,
}

impl PostgresBinding {
    /// The health probe: `SELECT 1` on the pool.
    pub async fn ping(&self) -> Result<(), String> {
        super::state_postgresql::pg_ping(&self.pool).await
    }

    /// Checks the metadata and builds the pool (nothing connects).
    pub fn open(c: &Component) -> Result<PostgresBinding, String> {
        // The app's SQL may leave a connection inside a transaction (`BEGIN` without
        // `COMMIT`, or after an error) or with a `SET`: such a connection must not reach the
        // next caller as it is (daprd's pgxpool drops it). Rolled back and reset before reuse;
        // `RESET ALL` goes back to the startup `statement_timeout`.
        let (pool, timeout) = pool_recycled(
            c,
            deadpool_postgres::RecyclingMethod::Custom("ROLLBACK; RESET ALL".into()),
        )?;
        Ok(PostgresBinding {
            pool,
            timeout,
            closed: AtomicBool::new(false),
        })
    }

    pub async fn invoke(
        &self,
        operation: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Option<BindingResponse>, String> {
        // daprd lets `close` succeed even when closed already.
        if operation == "close" {
            self.closed.store(true, Ordering::SeqCst);
            self.pool.close();
            return Ok(None);
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err("component is closed".into());
        }
        let sql = metadata
            .get("sql")
            .filter(|s| !s.is_empty())
            .ok_or("required metadata not set: sql")?;
        let params: Vec<Box<RawValue>> = match metadata.get("params").filter(|p| !p.is_empty()) {
            None => Vec::new(),
            Some(p) => serde_json::from_str(p).map_err(|e| {
                format!(
                    "invalid metadata property params: failed to unserialize into an array: {e}"
                )
            })?,
        };
        let params: Vec<TextParam> = params.iter().map(|p| TextParam::from_json(p)).collect();
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let start_time = jiff::Timestamp::now();
        let started = Instant::now();
        let mut out = BindingResponse::default();
        let work = async {
            let client = self
                .pool
                .get()
                .await
                .map_err(|e| format!("postgresql: cannot connect: {}", chain(&e)))?;
            match operation {
                "exec" => {
                    let n = client
                        .execute(sql.as_str(), &refs)
                        .await
                        .map_err(|e| format!("error executing query: {}", chain(&e)))?;
                    out.metadata.insert("rows-affected".into(), n.to_string());
                }
                "query" => {
                    // Rows are read as they come and written straight into the answer's
                    // JSON text (no row list, no `Value` tree: one copy of the result), which
                    // may not pass `MAX_QUERY_RESULT_BYTES`.
                    use futures_util::StreamExt;
                    let rows = client
                        .query_raw(sql.as_str(), refs.iter().copied())
                        .await
                        .map_err(|e| format!("error executing query: {}", chain(&e)))?;
                    let mut rows = std::pin::pin!(rows);
                    let mut text = String::from("[");
                    while let Some(row) = rows.next().await {
                        let row =
                            row.map_err(|e| format!("error executing query: {}", chain(&e)))?;
                        if text.len() > 1 {
                            text.push(',');
                        }
                        text.push('[');
                        for (i, column) in row.columns().iter().enumerate() {
                            if i > 0 {
                                text.push(',');
                            }
                            let raw: Option<Raw> = row
                                .try_get(i)
                                .map_err(|e| format!("error reading result: {e}"))?;
                            match raw {
                                None => text.push_str("null"),
                                Some(r) => text.push_str(&to_json(column.type_(), r.0)?),
                            }
                        }
                        text.push(']');
                        if text.len() > MAX_QUERY_RESULT_BYTES {
                            return Err(format!(
                                "the query result is larger than {} MiB: select fewer rows (LIMIT) or columns",
                                MAX_QUERY_RESULT_BYTES >> 20
                            ));
                        }
                    }
                    text.push(']');
                    out.data = Bytes::from(text);
                }
                other => {
                    return Err(format!(
                        "invalid operation type: {other}. Expected exec, query, or close"
                    ));
                }
            }
            Ok(())
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "postgresql: no answer within {}",
                    go_duration(self.timeout)
                ))
            })?;
        let elapsed = started.elapsed();
        let end_time = start_time
            .checked_add(jiff::SignedDuration::try_from(elapsed).unwrap_or_default())
            .unwrap_or(start_time);
        out.metadata.insert("operation".into(), operation.into());
        out.metadata.insert("sql".into(), sql.clone());
        out.metadata
            .insert("start-time".into(), rfc3339_nano(start_time));
        out.metadata
            .insert("end-time".into(), rfc3339_nano(end_time));
        out.metadata.insert("duration".into(), go_duration(elapsed));
        Ok(Some(out))
    }
}

/// The largest `query` answer (its JSON text): a query past it fails with a clear error
/// instead of holding an unbounded result in the sidecar's memory. Four times the default
/// request body limit; a result this large belongs in pages anyway.
pub const MAX_QUERY_RESULT_BYTES: usize = 16 << 20;

/// A parameter in PostgreSQL's text format (the server parses it for the column's type).
#[derive(Debug)]
struct TextParam(Option<String>);

impl TextParam {
    /// From the parameter's JSON text, read without going through `f64`: an integer of any
    /// size reaches the server digit for digit.
    fn from_json(v: &RawValue) -> TextParam {
        let text = v.get();
        TextParam(match text.as_bytes().first() {
            Some(b'n') => None,
            Some(b'"') => Some(serde_json::from_str::<String>(text).unwrap_or_default()),
            Some(b'-' | b'0'..=b'9') => Some(
                // Go decodes every number as float64 and pgx writes a whole one into an
                // integer column: `1.0` is `1` here too (an integer stays as written).
                match text.parse::<f64>() {
                    Ok(f)
                        if text.contains(['.', 'e', 'E'])
                            && f.fract() == 0.0
                            && f.abs() < 9.0e15 =>
                    {
                        format!("{}", f as i64)
                    }
                    _ => text.to_string(),
                },
            ),
            // true, false, objects and arrays: their JSON text.
            _ => Some(text.to_string()),
        })
    }
}

impl ToSql for TextParam {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0 {
            None => Ok(IsNull::Yes),
            Some(s) => {
                out.extend_from_slice(s.as_bytes());
                Ok(IsNull::No)
            }
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> tokio_postgres::types::Format {
        tokio_postgres::types::Format::Text
    }

    to_sql_checked!();
}

/// A column value as the server sent it (binary format), decoded by [`to_json`].
struct Raw<'a>(&'a [u8]);

impl<'a> FromSql<'a> for Raw<'a> {
    fn from_sql(
        _ty: &Type,
        raw: &'a [u8],
    ) -> Result<Raw<'a>, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw))
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }
}

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

fn take<const N: usize>(raw: &[u8], at: usize) -> Result<[u8; N], String> {
    raw.get(at..at + N)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| "truncated value from the server".to_string())
}

/// A binary column value as JSON text, as pgx's `rows.Values()` marshalled by Go's
/// `encoding/json` reads — except that numbers keep every digit (`numeric`, and `json`/`jsonb`
/// passed through as stored: Go would round them through `float64`) and a type read neither
/// as a number, JSON, time nor text goes as the base64 of its binary value (not its bytes as
/// if they were text). Hand-written: tokio-postgres has no "any value" type, and the crates
/// that decode numeric and arrays each pull in a second time/decimal library for what is a few
/// lines here.
fn to_json(ty: &Type, raw: &[u8]) -> Result<String, String> {
    use serde_json::Value;
    let base64 = |raw: &[u8]| Value::String(base64::engine::general_purpose::STANDARD.encode(raw));
    let value = match *ty {
        Type::BOOL => Value::Bool(raw.first().is_some_and(|b| *b != 0)),
        Type::INT2 => i16::from_be_bytes(take(raw, 0)?).into(),
        Type::INT4 => i32::from_be_bytes(take(raw, 0)?).into(),
        Type::INT8 => i64::from_be_bytes(take(raw, 0)?).into(),
        Type::OID => u32::from_be_bytes(take(raw, 0)?).into(),
        Type::FLOAT4 => float(f32::from_be_bytes(take(raw, 0)?) as f64),
        Type::FLOAT8 => float(f64::from_be_bytes(take(raw, 0)?)),
        Type::JSON => return json_text(raw),
        // jsonb: a version byte (1), then the text.
        Type::JSONB => return json_text(raw.get(1..).unwrap_or_default()),
        Type::BYTEA => base64(raw),
        Type::TIMESTAMP | Type::TIMESTAMPTZ => {
            let micros = i64::from_be_bytes(take(raw, 0)?);
            match micros {
                i64::MAX => Value::String("infinity".into()),
                i64::MIN => Value::String("-infinity".into()),
                m => jiff::Timestamp::from_microsecond(m.saturating_add(PG_EPOCH_MICROS))
                    .map(|t| Value::String(rfc3339_nano(t)))
                    .map_err(|e| e.to_string())?,
            }
        }
        Type::DATE => {
            let days = i32::from_be_bytes(take(raw, 0)?) as i64;
            match days {
                d if d == i32::MAX as i64 => Value::String("infinity".into()),
                d if d == i32::MIN as i64 => Value::String("-infinity".into()),
                d => jiff::Timestamp::from_second(d * 86_400 + PG_EPOCH_MICROS / 1_000_000)
                    .map(|t| Value::String(rfc3339_nano(t)))
                    .map_err(|e| e.to_string())?,
            }
        }
        Type::NUMERIC => return numeric(raw),
        // pgx gives a `[16]byte`, which Go marshals as 16 numbers.
        Type::UUID => Value::Array(raw.iter().map(|b| Value::from(*b)).collect()),
        // Types whose binary form is their text.
        Type::TEXT
        | Type::VARCHAR
        | Type::BPCHAR
        | Type::NAME
        | Type::CHAR
        | Type::XML
        | Type::UNKNOWN => match std::str::from_utf8(raw) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => base64(raw),
        },
        _ => match ty.kind() {
            Kind::Array(element) => return array(element, raw),
            Kind::Domain(inner) => return to_json(inner, raw),
            Kind::Enum(_) => Value::String(String::from_utf8_lossy(raw).into_owned()),
            // An extension's text type (citext) is text; anything else (ranges, intervals,
            // inet, money, geometric types, bit strings, …) is binary: base64.
            Kind::Simple if ty.name() == "citext" => {
                Value::String(String::from_utf8_lossy(raw).into_owned())
            }
            _ => base64(raw),
        },
    };
    Ok(value.to_string())
}

/// A `json`/`jsonb` value's text, checked, as it is (its numbers digit for digit).
fn json_text(raw: &[u8]) -> Result<String, String> {
    let value: &RawValue = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
    Ok(value.get().to_string())
}

/// A float as JSON (Go cannot marshal NaN or ±Inf; they come out as null here).
fn float(f: f64) -> serde_json::Value {
    serde_json::Number::from_f64(f).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

/// PostgreSQL's binary array: dimensions, flags, element type, (length, lower bound) per
/// dimension, then each element length-prefixed (-1: NULL). Nested arrays for more dimensions.
fn array(element: &Type, raw: &[u8]) -> Result<String, String> {
    let ndim = i32::from_be_bytes(take(raw, 0)?).max(0) as usize;
    if ndim == 0 {
        return Ok("[]".into());
    }
    let mut dims = Vec::with_capacity(ndim);
    for d in 0..ndim {
        dims.push(i32::from_be_bytes(take(raw, 12 + d * 8)?).max(0) as usize);
    }
    let mut at = 12 + ndim * 8;
    let mut items = Vec::new();
    let total: usize = dims.iter().product();
    for _ in 0..total {
        let len = i32::from_be_bytes(take(raw, at)?);
        at += 4;
        if len < 0 {
            items.push("null".to_string());
            continue;
        }
        let bytes = raw
            .get(at..at + len as usize)
            .ok_or("truncated array from the server")?;
        items.push(to_json(element, bytes)?);
        at += len as usize;
    }
    // Fold the flat list into nested arrays, innermost dimension first.
    for &d in dims.iter().skip(1).rev() {
        let mut folded = Vec::new();
        let mut it = items.into_iter();
        loop {
            let chunk: Vec<_> = it.by_ref().take(d).collect();
            if chunk.is_empty() {
                break;
            }
            folded.push(format!("[{}]", chunk.join(",")));
        }
        items = folded;
    }
    Ok(format!("[{}]", items.join(",")))
}

/// PostgreSQL's binary numeric (base-10000 digits) as JSON number text, every digit kept, as
/// pgtype.Numeric marshals (`NaN` and infinities as strings).
fn numeric(raw: &[u8]) -> Result<String, String> {
    let ndigits = u16::from_be_bytes(take(raw, 0)?) as usize;
    let weight = i16::from_be_bytes(take(raw, 2)?) as i32;
    let sign = u16::from_be_bytes(take(raw, 4)?);
    let dscale = u16::from_be_bytes(take(raw, 6)?) as usize;
    match sign {
        0xC000 => return Ok(r#""NaN""#.into()),
        0xD000 => return Ok(r#""Infinity""#.into()),
        0xF000 => return Ok(r#""-Infinity""#.into()),
        _ => {}
    }
    let mut digits = Vec::with_capacity(ndigits);
    for i in 0..ndigits {
        digits.push(u16::from_be_bytes(take(raw, 8 + i * 2)?));
    }
    let mut int = String::new();
    for w in 0..=weight.max(-1) {
        let d = digits.get(w as usize).copied().unwrap_or(0);
        if int.is_empty() {
            int = d.to_string();
        } else {
            int.push_str(&format!("{d:04}"));
        }
    }
    if int.is_empty() {
        int.push('0');
    }
    let mut frac = String::new();
    let mut w = weight + 1;
    while frac.len() < dscale {
        let d = if w < 0 {
            0
        } else {
            digits.get(w as usize).copied().unwrap_or(0)
        };
        frac.push_str(&format!("{d:04}"));
        w += 1;
    }
    frac.truncate(dscale);
    let text = format!(
        "{}{int}{}{frac}",
        if sign == 0x4000 { "-" } else { "" },
        if frac.is_empty() { "" } else { "." }
    );
    Ok(text)
}

/// Go's `time.RFC3339Nano` of the UTC time (fraction without trailing zeros).
fn rfc3339_nano(t: jiff::Timestamp) -> String {
    let nanos = t.subsec_nanosecond();
    let base = t.strftime("%Y-%m-%dT%H:%M:%S").to_string();
    if nanos == 0 {
        return format!("{base}Z");
    }
    let frac = format!("{nanos:09}");
    format!("{base}.{}Z", frac.trim_end_matches('0'))
}

/// Go's `time.Duration.String()`: `0s`, `850ns`, `1.5µs`, `12.345ms`, `2.5s`, `1m30s`.
pub fn go_duration(d: Duration) -> String {
    let n = d.as_nanos();
    let trim = |whole: u128, frac: u128, width: usize, unit: &str| {
        let f = format!("{frac:0width$}");
        let f = f.trim_end_matches('0');
        if f.is_empty() {
            format!("{whole}{unit}")
        } else {
            format!("{whole}.{f}{unit}")
        }
    };
    if n == 0 {
        return "0s".into();
    }
    if n < 1_000 {
        return format!("{n}ns");
    }
    if n < 1_000_000 {
        return trim(n / 1_000, n % 1_000, 3, "µs");
    }
    if n < 1_000_000_000 {
        return trim(n / 1_000_000, n % 1_000_000, 6, "ms");
    }
    let secs = n / 1_000_000_000;
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let seconds = trim(s, n % 1_000_000_000, 9, "s");
    match (h, m) {
        (0, 0) => seconds,
        (0, m) => format!("{m}m{seconds}"),
        (h, m) => format!("{h}h{m}m{seconds}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_go_writes_them() {
        assert_eq!(go_duration(Duration::ZERO), "0s");
        assert_eq!(go_duration(Duration::from_nanos(850)), "850ns");
        assert_eq!(go_duration(Duration::from_nanos(1_500)), "1.5µs");
        assert_eq!(go_duration(Duration::from_micros(12_345)), "12.345ms");
        assert_eq!(go_duration(Duration::from_millis(2_500)), "2.5s");
        assert_eq!(go_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(go_duration(Duration::from_secs(3_661)), "1h1m1s");
    }

    #[test]
    fn numerics_decode() {
        // 12.34: ndigits 2, weight 0, sign +, dscale 2, digits [12, 3400]
        let raw = [0, 2, 0, 0, 0, 0, 0, 2, 0, 12, 0x0D, 0x48];
        assert_eq!(numeric(&raw).unwrap(), "12.34");
        // -10000.5: digits [1, 0, 5000], weight 1, dscale 1
        let raw = [0, 3, 0, 1, 0x40, 0, 0, 1, 0, 1, 0, 0, 0x13, 0x88];
        assert_eq!(numeric(&raw).unwrap(), "-10000.5");
        // 0.0001: digits [1], weight -1, dscale 4
        let raw = [0, 1, 0xFF, 0xFF, 0, 0, 0, 4, 0, 1];
        assert_eq!(numeric(&raw).unwrap(), "0.0001");
    }

    #[test]
    fn whole_floats_go_as_integers() {
        let p = |v: &str| TextParam::from_json(&RawValue::from_string(v.into()).unwrap()).0;
        assert_eq!(p("1.0"), Some("1".into()));
        assert_eq!(p("1.5"), Some("1.5".into()));
        assert_eq!(p("null"), None);
        assert_eq!(p(r#""a\"b""#), Some("a\"b".into()));
        assert_eq!(p("true"), Some("true".into()));
        assert_eq!(p(r#"{"a":1}"#), Some(r#"{"a":1}"#.into()));
        // Beyond f64 and i64: digit for digit.
        assert_eq!(
            p("123456789012345678901234567890"),
            Some("123456789012345678901234567890".into())
        );
    }
}
