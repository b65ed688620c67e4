//! Durations on the command line: a whole number with a unit, `ms`, `s`, `m` or `h`
//! (`6s`, `500ms`, `10m`).

use std::time::Duration;

/// Parses `6s`, `500ms`, `10m`, `1h`; a bare number is seconds.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a duration: a whole number then ms, s, m or h"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => return Err(format!("unknown unit `{other}` in `{text}`: ms, s, m or h")),
    };
    if d.is_zero() {
        return Err(format!("`{text}`: a duration must be more than zero"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_bare_numbers_parse_and_nonsense_is_refused() {
        assert_eq!(parse("6s"), Ok(Duration::from_secs(6)));
        assert_eq!(parse("20"), Ok(Duration::from_secs(20)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse("0s").is_err());
        assert!(parse("s").is_err());
        assert!(parse("5 days").is_err());
        assert!(parse("-5s").is_err());
    }
}
