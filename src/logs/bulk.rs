//! The `elasticsearch` sink's request and answer: Elasticsearch's (and OpenSearch's) `_bulk`
//! API. Each record is a `create` into the configured index or data stream, with `@timestamp`
//! added from `time` when the record has none (data streams refuse a document without it).
//!
//! `_bulk` answers 200 even when some documents failed: `"errors":true` and one item per
//! document with its own status. [`outcome`] reads them: items refused with 429 or a 5xx are
//! sent again (only those), other 4xx (a mapping conflict, a malformed document) are refused for
//! good and counted, 409 on `create` means the document is already there (a retry that raced
//! its first attempt) and counts as taken.
//!
//! `"errors":false` means every document was taken, whatever the items say (a backend may leave
//! them out). With `"errors":true`, an answer whose number of items is not the batch's number of
//! records says nothing reliable about which record fared how (items are matched to records by
//! position), and neither does one that is not `_bulk`'s JSON: a failed attempt, the whole batch
//! is sent again. Each document carries an `_id` derived from where its record was read
//! ([`super::files::LineAt`] for files and the disk buffer; a process-unique one for the app's
//! lines held in memory and the access log), so a record the first attempt created answers 409
//! the next time, counted as taken: a resent batch is not stored twice (nor, for files, a batch
//! read again after a restart). `filter_path` in the URL, which drops items, is
//! refused when the configuration is checked.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::telemetry::json;

/// The `_bulk` body of one NDJSON batch, documents without an `_id`.
pub fn request(ndjson: &[u8], index: &str) -> Vec<u8> {
    request_with_ids(ndjson, index, &[])
}

/// The `_bulk` body of one NDJSON batch; `ids[i]`: the `_id` of the i-th record (none past
/// the end of `ids`).
pub fn request_with_ids(ndjson: &[u8], index: &str, ids: &[&str]) -> Vec<u8> {
    let mut action = b"{\"create\":{\"_index\":".to_vec();
    json::string(&mut action, index);
    let mut out = Vec::with_capacity(ndjson.len() * 2);
    for (i, line) in ndjson
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        out.extend_from_slice(&action);
        if let Some(id) = ids.get(i) {
            out.extend_from_slice(b",\"_id\":");
            json::string(&mut out, id);
        }
        out.extend_from_slice(b"}}\n");
        let doc = line.trim_ascii();
        match timestamp(doc) {
            Some(time) if doc.first() == Some(&b'{') => {
                out.extend_from_slice(b"{\"@timestamp\":");
                out.extend_from_slice(time.get().as_bytes());
                if doc[1..].trim_ascii_start() != b"}" {
                    out.push(b',');
                }
                out.extend_from_slice(&doc[1..]);
            }
            _ => out.extend_from_slice(doc),
        }
        out.push(b'\n');
    }
    out
}

/// The record's `time` when it has no `@timestamp`.
fn timestamp(doc: &[u8]) -> Option<&RawValue> {
    #[derive(Deserialize)]
    struct Times<'a> {
        #[serde(borrow, default)]
        time: Option<&'a RawValue>,
        #[serde(borrow, default, rename = "@timestamp")]
        timestamp: Option<&'a RawValue>,
    }
    let t: Times<'_> = serde_json::from_slice(doc).ok()?;
    if t.timestamp.is_some() {
        return None;
    }
    t.time
}

/// What `_bulk` said of a batch.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Positions (in the batch) of the records to send again.
    pub retry: Vec<usize>,
    /// Records refused for good.
    pub rejected: usize,
    /// The first refusal's reason, for the log line.
    pub message: String,
}

/// Reads a 2xx `_bulk` answer to a batch of `records`; None when every item succeeded. Err
/// when the answer is not `_bulk`'s, or says some items failed without holding one item per
/// record.
pub fn outcome(answer: &[u8], records: usize) -> Result<Option<Outcome>, String> {
    #[derive(Deserialize)]
    struct Answer {
        #[serde(default)]
        errors: bool,
        #[serde(default)]
        items: Vec<std::collections::HashMap<String, Item>>,
    }
    #[derive(Deserialize)]
    struct Item {
        status: u16,
        #[serde(default)]
        error: Option<serde_json::Value>,
    }
    let a: Answer = serde_json::from_slice(answer).map_err(|e| {
        let shown = &answer[..answer.len().min(200)];
        format!(
            "the _bulk answer is not readable ({e}): {}",
            String::from_utf8_lossy(shown)
        )
    })?;
    if !a.errors {
        return Ok(None);
    }
    if a.items.len() != records {
        return Err(format!(
            "the _bulk answer says some items failed but holds {} items for {records} records",
            a.items.len()
        ));
    }
    let mut o = Outcome {
        retry: Vec::new(),
        rejected: 0,
        message: String::new(),
    };
    for (i, item) in a.items.iter().enumerate() {
        let Some(item) = item.values().next() else {
            return Err(format!("the _bulk answer's item {i} is empty"));
        };
        match item.status {
            200..=299 | 409 => continue,
            429 | 500..=599 => o.retry.push(i),
            _ => o.rejected += 1,
        }
        if o.message.is_empty() {
            o.message = format!(
                "item {i}: {} {}",
                item.status,
                item.error
                    .as_ref()
                    .map(|e| e.to_string())
                    .unwrap_or_default()
            );
        }
    }
    Ok((!o.retry.is_empty() || o.rejected > 0).then_some(o))
}

/// The records at `positions` of an NDJSON batch.
pub fn pick(ndjson: &[u8], positions: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, line) in ndjson
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        if positions.binary_search(&i).is_ok() {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_become_creates_with_a_timestamp() {
        let body = request(
            b"{\"message\":\"a\",\"time\":\"2024-01-01T00:00:00Z\"}\n {\"@timestamp\":\"x\",\"time\":\"y\"} \n{}\n",
            "logs-app-default",
        );
        let lines: Vec<serde_json::Value> = body
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 6);
        assert_eq!(lines[0]["create"]["_index"], "logs-app-default");
        assert_eq!(lines[1]["@timestamp"], "2024-01-01T00:00:00Z");
        assert_eq!(lines[1]["message"], "a");
        assert_eq!(lines[3]["@timestamp"], "x");
        assert_eq!(lines[5], serde_json::json!({}));
        assert!(lines[0]["create"].get("_id").is_none());
        let body = request_with_ids(b"{}\n{}\n", "i", &["a.1", "a.2"]);
        let lines: Vec<serde_json::Value> = body
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(lines[0]["create"]["_id"], "a.1");
        assert_eq!(lines[2]["create"]["_id"], "a.2");
        assert_eq!(lines[2]["create"]["_index"], "i");
    }

    #[test]
    fn item_errors_are_sorted_into_retry_and_refused() {
        let answer = br#"{"took":3,"errors":true,"items":[
            {"create":{"status":201}},
            {"create":{"status":429,"error":{"type":"es_rejected_execution_exception"}}},
            {"create":{"status":400,"error":{"type":"mapper_parsing_exception"}}},
            {"create":{"status":409}},
            {"create":{"status":503}}]}"#;
        let o = outcome(answer, 5).unwrap().unwrap();
        assert_eq!(o.retry, [1, 4]);
        assert_eq!(o.rejected, 1);
        assert!(
            o.message.contains("es_rejected_execution_exception"),
            "{}",
            o.message
        );
        assert_eq!(outcome(br#"{"errors":false,"items":[]}"#, 0), Ok(None));
        assert_eq!(pick(b"a\nb\nc\nd\ne\n", &[1, 4]), b"b\ne\n");
    }

    #[test]
    fn an_answer_without_errors_is_taken_and_one_with_errors_but_not_an_item_per_record_is_a_failed_attempt()
     {
        let ok =
            br#"{"errors":false,"items":[{"create":{"status":201}},{"create":{"status":201}}]}"#;
        assert_eq!(outcome(ok, 2), Ok(None));
        // No errors: taken, whatever the items (a backend that leaves them out, or another
        // number of them), so the batch is not sent again and stored twice.
        assert_eq!(outcome(ok, 3), Ok(None));
        assert_eq!(outcome(br#"{"errors":false}"#, 5), Ok(None));
        // Errors, and one item short (or one too many): positions would name the wrong records.
        let short = br#"{"errors":true,"items":[{"create":{"status":429}}]}"#;
        let e = outcome(short, 2).unwrap_err();
        assert!(e.contains("1 items for 2 records"), "{e}");
        assert!(outcome(br#"{"errors":true}"#, 1).is_err());
        // Not _bulk's answer at all (a proxy's page, a cut body), or an item without its action.
        assert!(outcome(b"<html>ok</html>", 1).is_err());
        assert!(outcome(b"", 1).is_err());
        assert!(outcome(br#"{"errors":true,"items":[{}]}"#, 1).is_err());
    }
}
