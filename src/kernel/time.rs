//! ISO-8601 timestamps: the dates in message headers the bridge sends, and the
//! `timestamp` of stdout/stderr lines (UTC, microseconds, `+00:00` offset, as the
//! reference writes them: `2025-01-02T03:04:05.123456+00:00`).

use std::time::{SystemTime, UNIX_EPOCH};

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Formats microseconds since the epoch as `YYYY-MM-DDTHH:MM:SS.ffffff+00:00`.
pub fn format_micros(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:06}+00:00",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

fn now_micros() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

/// The current time in the stream-line format.
pub fn now_iso() -> String {
    format_micros(now_micros())
}

/// Parses an ISO-8601 date-time as kernels write it (`2025-01-02T03:04:05.123Z`,
/// `…05.123456+02:00`, `…05`, space instead of `T`) into microseconds since the epoch.
pub fn parse_iso(s: &str) -> Option<i64> {
    let s = s.trim();
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if part.is_empty() || !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !(b[10] == b'T' || b[10] == b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut i = 19;
    let mut micros = 0i64;
    if b.get(i) == Some(&b'.') || b.get(i) == Some(&b',') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let digits = &s[start..i];
        let mut padded: String = digits.chars().take(6).collect();
        while padded.len() < 6 {
            padded.push('0');
        }
        micros = padded.parse().ok()?;
    }
    let offset_secs = match &s[i..] {
        "" | "Z" | "z" => 0,
        tz => {
            let sign = match tz.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let rest = tz[1..].replace(':', "");
            if rest.len() != 4 || !rest.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            let oh: i64 = rest[..2].parse().ok()?;
            let om: i64 = rest[2..].parse().ok()?;
            sign * (oh * 3600 + om * 60)
        }
    };
    // Month and day ranges were checked above, so the casts cannot truncate.
    let days = days_from_civil(y, mo as u32, d as u32);
    let secs = days * 86_400 + h * 3600 + mi * 60 + se - offset_secs;
    Some(secs * 1_000_000 + micros)
}

/// A kernel header date in the stream-line format, or the current time when the
/// kernel sent none or an unreadable one.
pub fn stream_timestamp(kernel_date: Option<&str>) -> String {
    kernel_date
        .and_then(parse_iso)
        .map(format_micros)
        .unwrap_or_else(now_iso)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses() {
        assert_eq!(format_micros(0), "1970-01-01T00:00:00.000000+00:00");
        let t = parse_iso("2025-01-02T03:04:05.123456Z").expect("parse");
        assert_eq!(format_micros(t), "2025-01-02T03:04:05.123456+00:00");
        assert_eq!(
            stream_timestamp(Some("2024-02-29T23:30:00.5+01:00")),
            "2024-02-29T22:30:00.500000+00:00"
        );
        assert_eq!(
            stream_timestamp(Some("2024-12-31 23:59:59.1234567-00:30")),
            "2025-01-01T00:29:59.123456+00:00"
        );
        assert_eq!(
            stream_timestamp(Some("1999-03-01T00:00:00")),
            "1999-03-01T00:00:00.000000+00:00"
        );
    }

    #[test]
    fn garbage_falls_back_to_now() {
        for bad in [
            "",
            "yesterday",
            "2025-13-01T00:00:00Z",
            "2025-01-01T00:00:00+5",
        ] {
            assert_eq!(parse_iso(bad), None, "{bad}");
        }
        let now = stream_timestamp(Some("nope"));
        assert!(now.ends_with("+00:00") && now.len() == 32, "{now}");
    }

    #[test]
    fn civil_roundtrip() {
        for days in [-800_000, -1, 0, 1, 59, 60, 11_000, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
