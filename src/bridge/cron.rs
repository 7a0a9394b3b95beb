//! `bindings.cron`'s schedule, read as daprd reads it (robfig/cron with optional seconds and
//! descriptors): five fields (minute hour day-of-month month day-of-week), six with seconds
//! first, `@yearly`/`@annually`, `@monthly`, `@weekly`, `@daily`/`@midnight`, `@hourly`, and
//! `@every <duration>` (Go's duration syntax, whole seconds, at least 1 s), optionally prefixed
//! by `CRON_TZ=<zone>` or `TZ=<zone>`. Field syntax is croner's (`*`, lists, ranges, steps,
//! names); the times are computed in the `timeZone` metadata's zone (IANA name, from the
//! system's zoneinfo), else the sidecar's local zone.

use std::time::Duration;

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use jiff::Zoned;
use jiff::tz::TimeZone;

/// When a cron binding fires.
#[derive(Clone, Debug)]
pub enum Schedule {
    /// `@every d`: d after the start, then every d.
    Every(Duration),
    /// A cron expression in a time zone.
    Cron { cron: Box<Cron>, zone: TimeZone },
}

impl Schedule {
    /// Parses `spec` (the `schedule` metadata) in `zone` (the `timeZone` metadata).
    pub fn parse(spec: &str, zone: Option<&str>) -> Result<Schedule, String> {
        let spec = spec.trim();
        let (spec_zone, spec) = match spec
            .strip_prefix("CRON_TZ=")
            .or_else(|| spec.strip_prefix("TZ="))
        {
            Some(rest) => match rest.split_once(char::is_whitespace) {
                Some((z, s)) => (Some(z), s.trim()),
                None => return Err(format!("expected a schedule after {spec:?}")),
            },
            None => (None, spec),
        };
        if let Some(every) = spec.strip_prefix("@every") {
            let every = every.trim();
            let d = go_duration(every).ok_or_else(|| {
                format!("expected @every with a duration such as 15s or 1h30m, found {every:?}")
            })?;
            // robfig: below one second is one second; sub-second parts are dropped.
            return Ok(Schedule::Every(Duration::from_secs(d.as_secs().max(1))));
        }
        let zone = match spec_zone.or(zone) {
            Some(name) => {
                TimeZone::get(name).map_err(|e| format!("unknown time zone {name:?}: {e}"))?
            }
            None => TimeZone::system(),
        };
        let pattern = if spec.eq_ignore_ascii_case("@midnight") {
            "@daily"
        } else {
            spec
        };
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(pattern)
            .map_err(|e| {
                format!("expected a cron schedule such as \"*/15 * * * * *\" or \"@every 15s\", found {spec:?}: {e}")
            })?;
        Ok(Schedule::Cron {
            cron: Box::new(cron),
            zone,
        })
    }

    /// How long from `now` (a Unix timestamp) until the next firing; `None` when the
    /// expression never fires again.
    pub fn wait_from(&self, now: jiff::Timestamp) -> Option<Duration> {
        match self {
            Schedule::Every(d) => Some(*d),
            Schedule::Cron { cron, zone } => {
                let now_z: Zoned = now.to_zoned(zone.clone());
                let next = cron.find_next_occurrence(&now_z, false).ok()?;
                let d = next.timestamp().duration_since(now);
                Duration::try_from(d).ok()
            }
        }
    }
}

/// A Go duration (`300ms`, `1.5h`, `2h45m`): a sequence of decimal numbers with units `ns`,
/// `us`/`µs`, `ms`, `s`, `m`, `h`. Written by hand: humantime reads another syntax (`1h 30m`,
/// days, no fractions) and the Dapr docs write Go's.
pub fn go_duration(s: &str) -> Option<Duration> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += number * scale;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn schedules_as_daprd_reads_them() {
        let every = Schedule::parse("@every 15s", None).unwrap();
        assert_eq!(
            every.wait_from(at("2026-01-01T00:00:00Z")),
            Some(Duration::from_secs(15))
        );
        assert!(matches!(
            Schedule::parse("@every 100ms", None).unwrap(),
            Schedule::Every(d) if d == Duration::from_secs(1)
        ));
        // Six fields: seconds first.
        let s = Schedule::parse("*/10 * * * * *", Some("UTC")).unwrap();
        assert_eq!(
            s.wait_from(at("2026-01-01T00:00:03Z")),
            Some(Duration::from_secs(7))
        );
        // Five fields: minutes first.
        let s = Schedule::parse("30 * * * *", Some("UTC")).unwrap();
        assert_eq!(
            s.wait_from(at("2026-01-01T00:10:00Z")),
            Some(Duration::from_secs(20 * 60))
        );
        let s = Schedule::parse("@daily", Some("Europe/Paris")).unwrap();
        assert_eq!(
            s.wait_from(at("2026-01-01T22:00:00Z")),
            Some(Duration::from_secs(3600))
        );
        let s = Schedule::parse("CRON_TZ=UTC @midnight", Some("Europe/Paris")).unwrap();
        assert_eq!(
            s.wait_from(at("2026-01-01T22:00:00Z")),
            Some(Duration::from_secs(2 * 3600))
        );
        for bad in ["every 15s", "@every soon", "* * *", "61 * * * *", ""] {
            assert!(Schedule::parse(bad, None).is_err(), "{bad}");
        }
        assert!(
            Schedule::parse("@hourly", Some("Mars/Olympus"))
                .unwrap_err()
                .contains("unknown time zone")
        );
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(go_duration("15"), None);
        assert_eq!(go_duration("1d"), None);
    }
}
