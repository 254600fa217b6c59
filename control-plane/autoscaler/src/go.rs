//! Values as Knative reads them from ConfigMaps and annotations: Go's `time.ParseDuration`,
//! `strconv.ParseBool`, `ParseFloat` and `ParseInt(_, 10, 32)`. Each returns a short reason on
//! failure; the caller names the key.

use std::time::Duration;

/// A Go duration string (`60s`, `1m30s`, `1.5h`, `500ms`, `-1s`, `0`) in signed nanoseconds.
pub(crate) fn parse_duration_nanos(s: &str) -> Result<i128, &'static str> {
    const BAD: &str = "not a duration (examples: 60s, 1m30s, 500ms)";
    let (negative, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(BAD);
    }
    let mut total: i128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int_digits, after) = rest.split_at(int_len);
        let (frac_digits, after) = match after.strip_prefix('.') {
            Some(f) => {
                let n = f.bytes().take_while(u8::is_ascii_digit).count();
                f.split_at(n)
            }
            None => ("", after),
        };
        if int_digits.is_empty() && frac_digits.is_empty() {
            return Err(BAD);
        }
        let unit_len = after
            .bytes()
            .take_while(|b| *b != b'.' && !b.is_ascii_digit())
            .count();
        let (unit, after) = after.split_at(unit_len);
        let unit_nanos: i128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err("missing unit in duration (examples: 60s, 1m30s, 500ms)"),
            _ => return Err("unknown unit in duration (use ns, us, ms, s, m or h)"),
        };
        let whole: i128 = if int_digits.is_empty() {
            0
        } else {
            int_digits.parse().map_err(|_| "duration out of range")?
        };
        // Fractions beyond 18 digits cannot change a nanosecond count of any sane duration.
        let frac_digits = &frac_digits[..frac_digits.len().min(18)];
        let frac: i128 = if frac_digits.is_empty() {
            0
        } else {
            let scale = 10i128.pow(frac_digits.len() as u32);
            frac_digits.parse::<i128>().map_err(|_| BAD)? * unit_nanos / scale
        };
        total = whole
            .checked_mul(unit_nanos)
            .and_then(|w| w.checked_add(frac))
            .and_then(|v| total.checked_add(v))
            .filter(|t| *t <= i64::MAX as i128)
            .ok_or("duration out of range")?;
        rest = after;
    }
    Ok(if negative { -total } else { total })
}

/// A Go duration that must not be negative.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, &'static str> {
    let nanos = parse_duration_nanos(s)?;
    if nanos < 0 {
        return Err("must not be negative");
    }
    Ok(Duration::from_nanos(nanos as u64))
}

/// Go's `strconv.ParseBool`.
pub(crate) fn parse_bool(s: &str) -> Result<bool, &'static str> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err("not a boolean (true or false)"),
    }
}

/// A finite float (Go's `ParseFloat` also takes `inf` and `NaN`; no knob means anything by them).
pub(crate) fn parse_float(s: &str) -> Result<f64, &'static str> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err("not a number"),
    }
}

/// A whole number in Go's int32 range.
pub(crate) fn parse_int32(s: &str) -> Result<i32, &'static str> {
    s.parse::<i32>().map_err(|e| match e.kind() {
        std::num::IntErrorKind::PosOverflow | std::num::IntErrorKind::NegOverflow => {
            "out of range (at most 2147483647)"
        }
        _ => "not a whole number",
    })
}

/// A duration the way people write them in these knobs: `0s`, `500ms`, `6s`, `1m30s`, `1h`.
pub(crate) fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_millis());
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out += &format!("{h}h");
    }
    if m > 0 {
        out += &format!("{m}m");
    }
    let millis = d.subsec_millis();
    match (s, millis) {
        (0, 0) => {}
        (s, 0) => out += &format!("{s}s"),
        (s, ms) => out += &format!("{s}.{ms:03}s"),
    }
    out
}

/// True when `d` is a whole number of seconds (Knative's "at most second precision").
pub(crate) fn whole_seconds(d: Duration) -> bool {
    d.subsec_nanos() == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i128 = 1_000_000_000;

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration_nanos("60s"), Ok(60 * S));
        assert_eq!(parse_duration_nanos("1m30s"), Ok(90 * S));
        assert_eq!(parse_duration_nanos("6s"), Ok(6 * S));
        assert_eq!(parse_duration_nanos("1h"), Ok(3600 * S));
        assert_eq!(parse_duration_nanos("1.5h"), Ok(5400 * S));
        assert_eq!(parse_duration_nanos("500ms"), Ok(S / 2));
        assert_eq!(parse_duration_nanos(".5s"), Ok(S / 2));
        assert_eq!(parse_duration_nanos("1h2m3.25s"), Ok(3723 * S + S / 4));
        assert_eq!(parse_duration_nanos("3us"), Ok(3_000));
        assert_eq!(parse_duration_nanos("3µs"), Ok(3_000));
        assert_eq!(parse_duration_nanos("0"), Ok(0));
        assert_eq!(parse_duration_nanos("-0"), Ok(0));
        assert_eq!(parse_duration_nanos("-1s"), Ok(-S));
        assert_eq!(parse_duration_nanos("+2s"), Ok(2 * S));
    }

    #[test]
    fn bad_durations_are_refused() {
        for bad in [
            "",
            "1",
            "s",
            "sixty",
            "1x",
            ".s",
            "1s2",
            "-",
            "1..5s",
            "9999999999h",
        ] {
            assert!(
                parse_duration_nanos(bad).is_err(),
                "{bad:?} should not parse"
            );
        }
        assert_eq!(parse_duration("-1s"), Err("must not be negative"));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
    }

    #[test]
    fn scalars_parse_like_go() {
        assert_eq!(parse_bool("True"), Ok(true));
        assert_eq!(parse_bool("0"), Ok(false));
        assert!(parse_bool("yes").is_err());
        assert_eq!(parse_float("70"), Ok(70.0));
        assert_eq!(parse_float("1e3"), Ok(1000.0));
        assert!(parse_float("NaN").is_err());
        assert!(parse_float("inf").is_err());
        assert_eq!(parse_int32("-3"), Ok(-3));
        assert_eq!(parse_int32("+3"), Ok(3));
        assert!(parse_int32("1.5").is_err());
        assert_eq!(
            parse_int32("2147483648"),
            Err("out of range (at most 2147483647)")
        );
        assert!(whole_seconds(Duration::from_secs(6)));
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
        assert_eq!(format_duration(Duration::from_millis(6500)), "6.500s");
        assert!(!whole_seconds(Duration::from_millis(6500)));
    }
}
