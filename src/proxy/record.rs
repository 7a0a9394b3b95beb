//! The request record's last phase: finishing it. The response body is wrapped so the record
//! ([`crate::telemetry::record`]) is finished when the body is done, or dropped (the client went
//! away); a request dropped before it had a response is recorded as 499 `client-closed`.
//!
//! In: the request's [`Entry`] and the response. Out: a finished record to the access log and
//! the span exporter ([`Recorder::finish`]). The HTTP/1 fast path, which has no response body
//! to wrap, keeps a [`Recording`] instead and says how the response went.

use super::body::{End, ProxyBody, Tap, tap};
use crate::telemetry::record::{Entry, Recorder, Routed};

/// A request not answered yet: if it is dropped first (an HTTP/2 reset, a client gone while
/// its request waited), its record is still finished, with status 499 and `client-closed`.
pub struct Unanswered(Option<(Recorder, Entry)>);

impl Unanswered {
    pub fn new(recorder: &Recorder, entry: Entry) -> Unanswered {
        Unanswered(Some((recorder.clone(), entry)))
    }

    /// The request got a response: its record is finished when the response body is done.
    pub fn answered(mut self, res: http::Response<ProxyBody>) -> http::Response<ProxyBody> {
        let (recorder, entry) = self.0.take().expect("answered once");
        let status = res.status().as_u16();
        let error = res
            .headers()
            .get("x-outrigger-error")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let routed = res
            .extensions()
            .get::<Routed>()
            .cloned()
            .unwrap_or_default();
        res.map(|body| {
            tap(
                body,
                Pending {
                    recorder,
                    entry,
                    status,
                    error,
                    routed,
                    bytes_out: 0,
                },
            )
        })
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some((recorder, entry)) = self.0.take() {
            Pending {
                recorder,
                entry,
                status: 499,
                error: Some("client-closed".to_string()),
                routed: Routed::default(),
                bytes_out: 0,
            }
            .finish();
        }
    }
}

struct Pending {
    recorder: Recorder,
    entry: Entry,
    status: u16,
    error: Option<String>,
    routed: Routed,
    bytes_out: u64,
}

impl Pending {
    fn finish(self) {
        self.recorder.finish(
            self.entry,
            self.status,
            self.error,
            self.routed,
            self.bytes_out,
        );
    }
}

/// The response body, counted; the record is finished at its end or when it is dropped.
impl Tap for Pending {
    fn data(&mut self, len: u64) {
        self.bytes_out += len;
    }
    fn end(mut self, how: End) {
        match how {
            End::Done => {}
            End::Failed => self.error = Some("upstream-reset".to_string()),
            // Dropped before its end: the client went away mid-body.
            End::Dropped { at_end } => {
                if self.error.is_none() && !at_end {
                    self.error = Some("client-closed".to_string());
                }
            }
        }
        self.finish();
    }
}

/// A fast-path request's record ([`super::fast_path`]): the same fields and the same ends as
/// [`Unanswered`] and its tapped body give a request on hyper's path. Finished when it is
/// dropped: as 499 `client-closed` until [`Recording::answered`], then with the answer's
/// status and the body bytes counted so far.
pub(super) struct Recording(Option<Pending>);

impl Recording {
    pub(super) fn new(recorder: &Recorder, entry: Entry) -> Recording {
        Recording(Some(Pending {
            recorder: recorder.clone(),
            entry,
            // 499 `client-closed` if dropped unanswered: the error is set then (End::Dropped).
            status: 499,
            error: None,
            routed: Routed::default(),
            bytes_out: 0,
        }))
    }

    /// A response head went out (`error`: Outrigger's own answer's `x-outrigger-error`).
    pub(super) fn answered(&mut self, status: u16, error: Option<&str>, routed: Routed) {
        if let Some(p) = &mut self.0 {
            p.status = status;
            p.error = error.map(str::to_string);
            p.routed = routed;
        }
    }

    /// The response body's data bytes written so far.
    pub(super) fn sent(&mut self, bytes: u64) {
        if let Some(p) = &mut self.0 {
            p.bytes_out = bytes;
        }
    }

    /// The response body's end: its data bytes, and how it ended (as a tapped body's).
    pub(super) fn end(mut self, bytes_out: u64, how: End) {
        if let Some(mut p) = self.0.take() {
            p.bytes_out = bytes_out;
            p.end(how);
        }
    }
}

impl Drop for Recording {
    /// Dropped before its end (the connection's task was): the client went away.
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            p.end(End::Dropped { at_end: false });
        }
    }
}
