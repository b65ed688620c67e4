//! How the command line reads and writes times: always UTC, `2026-11-30 18:55:30Z` for
//! people, RFC 3339 next to the Unix number in JSON, and instants on the command line as
//! RFC 3339, Unix seconds or a duration before now.

use anyhow::{Result, bail};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A Unix time in seconds for people: `2026-11-30 18:55:30Z` (RFC 3339 with a space, so a
/// column of them reads at a glance). A time past what a calendar date can hold (year
/// 9999) is shown as its number.
pub(crate) fn human_s(unix_s: u64) -> String {
    match datetime(i128::from(unix_s) * 1_000_000_000) {
        Some(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        None => format!("@{unix_s}"),
    }
}

/// A Unix time in milliseconds for people, to the second (see [`human_s`]).
pub(crate) fn human_ms(unix_ms: u64) -> String {
    human_s(unix_ms / 1000)
}

/// A Unix time in seconds as RFC 3339 for JSON: `2026-11-30T18:55:30Z` (the number itself
/// when no date can hold it).
pub(crate) fn rfc3339_s(unix_s: u64) -> String {
    rfc3339(i128::from(unix_s) * 1_000_000_000).unwrap_or_else(|| unix_s.to_string())
}

/// A Unix time in milliseconds as RFC 3339 for JSON: `2026-11-30T18:55:30.123Z`.
pub(crate) fn rfc3339_ms(unix_ms: u64) -> String {
    rfc3339(i128::from(unix_ms) * 1_000_000).unwrap_or_else(|| unix_ms.to_string())
}

/// How far `t` is from `now` for people: "in 4m 10s", "3h 2m ago", "now".
pub(crate) fn relative(t: u64, now: u64) -> String {
    if t == now {
        return "now".to_owned();
    }
    let span = duration(t.abs_diff(now));
    if t > now {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

/// Seconds in the two largest units that matter: "45s", "4m 10s", "3h 2m", "2d 5h".
fn duration(s: u64) -> String {
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// An instant given on the command line, as Unix milliseconds: RFC 3339
/// (`2026-11-30T18:55:30Z`, a space for the `T`, or a date alone for its midnight UTC),
/// Unix seconds (`1764528930`), or a duration before `now_ms` (`90s`, `15m`, `1h`, `2d`).
pub(crate) fn parse_instant_ms(text: &str, now_ms: u64) -> Result<u64> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return match text.parse::<u64>().ok().and_then(|s| s.checked_mul(1000)) {
            Some(ms) => Ok(ms),
            None => bail!("`{text}`: too large for a Unix time in seconds"),
        };
    }
    if let Some(ago) = parse_duration_s(text) {
        return Ok(now_ms.saturating_sub(ago.saturating_mul(1000)));
    }
    // RFC 3339 proper has a `T`; people type a space, or a date alone.
    let mut normal = text.to_owned();
    if normal.len() == 10 {
        normal.push_str("T00:00:00Z");
    } else if normal.as_bytes().get(10) == Some(&b' ') {
        normal.replace_range(10..11, "T");
    }
    match OffsetDateTime::parse(&normal, &Rfc3339) {
        Ok(t) => u64::try_from(t.unix_timestamp_nanos() / 1_000_000)
            .map_err(|_| anyhow::anyhow!("`{text}` is before 1970")),
        Err(e) => bail!(
            "`{text}` is not a time: give RFC 3339 (2026-11-30T18:55:30Z), Unix seconds, or \
             a duration before now (90s, 15m, 1h, 2d) ({e})"
        ),
    }
}

/// `90s`, `15m`, `1h`, `2d` in seconds; `None` for anything else.
fn parse_duration_s(text: &str) -> Option<u64> {
    let unit = match text.chars().last()? {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        'w' => 7 * 86_400,
        _ => return None,
    };
    let number = &text[..text.len() - 1];
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    number.parse::<u64>().ok()?.checked_mul(unit)
}

fn datetime(unix_ns: i128) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(unix_ns).ok()
}

fn rfc3339(unix_ns: i128) -> Option<String> {
    datetime(unix_ns)?.format(&Rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-30 18:55:30 UTC.
    const T: u64 = 1_796_064_930;

    #[test]
    fn times_print_in_utc_for_people_and_as_rfc3339_for_json() {
        assert_eq!(human_s(T), "2026-11-30 18:55:30Z");
        assert_eq!(human_ms(T * 1000 + 999), "2026-11-30 18:55:30Z");
        assert_eq!(rfc3339_s(T), "2026-11-30T18:55:30Z");
        assert_eq!(rfc3339_ms(T * 1000 + 120), "2026-11-30T18:55:30.12Z");
        assert_eq!(human_s(u64::MAX), format!("@{}", u64::MAX));
    }

    #[test]
    fn instants_are_read_as_rfc3339_unix_seconds_or_a_duration_before_now() {
        let now = (T + 7200) * 1000;
        for text in [
            "2026-11-30T18:55:30Z",
            "2026-11-30 18:55:30Z",
            "2026-11-30T19:55:30+01:00",
            "1796064930",
            "2h",
            "120m",
        ] {
            assert_eq!(parse_instant_ms(text, now).expect(text), T * 1000, "{text}");
        }
        assert_eq!(
            parse_instant_ms("2026-11-30", now).expect("date"),
            (T - (18 * 3600 + 55 * 60 + 30)) * 1000
        );
        for bad in ["", "yesterday", "1x", "h", "2026-13-01T00:00:00Z", "-5"] {
            assert!(parse_instant_ms(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn relative_times_name_the_two_largest_units() {
        assert_eq!(relative(T + 250, T), "in 4m 10s");
        assert_eq!(relative(T - 3 * 3600 - 120, T), "3h 2m ago");
        assert_eq!(relative(T, T), "now");
        assert_eq!(relative(T + 45, T), "in 45s");
        assert_eq!(relative(T + 2 * 86_400 + 5 * 3600, T), "in 2d 5h");
    }
}
