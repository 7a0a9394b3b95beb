//! Range checks shared by the sections' validation (listeners, clusters, routes): counts and
//! durations within what the runtime can hold, each problem located at its key.

use super::document::{Document, Problem};
use super::types::Duration;

/// Upper bound of counts (connections, requests in flight): beyond any sidecar's need, and
/// below what a semaphore can hold.
pub const MAX_COUNT: usize = 1_000_000;
/// Upper bound of every duration: a day (larger values overflow deadline arithmetic).
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(86_400);

pub fn check_count(doc: &Document, problems: &mut Vec<Problem>, path: &str, n: Option<usize>) {
    if let Some(n) = n
        && !(1..=MAX_COUNT).contains(&n)
    {
        problems.push(doc.problem(
            path,
            format!("expected a number from 1 to {MAX_COUNT}, found {n}"),
        ));
    }
}

pub fn check_duration(
    doc: &Document,
    problems: &mut Vec<Problem>,
    path: &str,
    d: Option<Duration>,
    allow_zero: bool,
) {
    if let Some(d) = d {
        if d.get().is_zero() && !allow_zero {
            problems.push(doc.problem(path, "expected a positive duration, found 0s"));
        } else if d.get() > MAX_DURATION {
            problems.push(doc.problem(path, format!("expected at most 24h, found {d}")));
        }
    }
}
