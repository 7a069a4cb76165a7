//! Event time buckets: the local day and minute of an event in UTC+08:00.
//!
//! SPEC section 2 fixes the offset (no time zones, no DST): `day` is
//! `YYYY-MM-DD` and `minute` is `YYYY-MM-DDTHH:MM` of `ts + 8 h`. Buckets are
//! kept as integers (minutes or days since the epoch, local) on the hot path
//! and formatted only when a row is written.

use std::fmt;

const OFFSET_MS: i64 = 8 * 3600 * 1000;
const MS_PER_MINUTE: i64 = 60_000;
const MINUTES_PER_DAY: i64 = 24 * 60;

/// A local (UTC+08:00) minute: minutes since 1970-01-01T00:00 local.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct LocalMinute(pub i64);

/// A local (UTC+08:00) day: days since 1970-01-01 local.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct LocalDay(pub i64);

impl LocalMinute {
    /// The local minute of a timestamp in ms since the Unix epoch. Total: any
    /// i64 timestamp has a minute (computed in i128, so nothing overflows).
    pub fn of_ms(ts: i64) -> Self {
        let m = (i128::from(ts) + i128::from(OFFSET_MS)).div_euclid(i128::from(MS_PER_MINUTE));
        // |ts| / 60000 fits easily in i64.
        Self(m as i64)
    }

    /// The local day this minute falls in.
    pub fn day(self) -> LocalDay {
        LocalDay(self.0.div_euclid(MINUTES_PER_DAY))
    }

    /// The local hour this minute falls in: hours since 1970-01-01T00:00 local.
    pub fn hour(self) -> i64 {
        self.0.div_euclid(60)
    }
}

impl LocalDay {
    /// The local day of a timestamp in ms since the Unix epoch.
    pub fn of_ms(ts: i64) -> Self {
        LocalMinute::of_ms(ts).day()
    }

    /// (year, month, day) of the proleptic Gregorian calendar.
    pub fn civil(self) -> (i64, u32, u32) {
        civil_from_days(self.0)
    }

    /// Parse `YYYY-MM-DD` as written by `Display`.
    pub fn parse(s: &str) -> Option<Self> {
        let (y, rest) = s.rsplit_once('-').and_then(|(ym, d)| Some((ym.rsplit_once('-')?, d)))?;
        let (year, month) = (y.0.parse::<i64>().ok()?, y.1.parse::<u32>().ok()?);
        let day = rest.parse::<u32>().ok()?;
        if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
            return None;
        }
        Some(Self(days_from_civil(year, month, day)))
    }
}

impl fmt::Display for LocalDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.civil();
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

impl fmt::Display for LocalMinute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let of_day = self.0.rem_euclid(MINUTES_PER_DAY);
        write!(f, "{}T{:02}:{:02}", self.day(), of_day / 60, of_day % 60)
    }
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (y, m, d).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_in_utc_plus_8() {
        // 2024-11-17T16:00:00Z is local midnight of 2024-11-18.
        let midnight = 1_731_859_200_000;
        assert_eq!(LocalMinute::of_ms(midnight).to_string(), "2024-11-18T00:00");
        assert_eq!(LocalMinute::of_ms(midnight - 1).to_string(), "2024-11-17T23:59");
        assert_eq!(LocalDay::of_ms(midnight - 1).to_string(), "2024-11-17");
        assert_eq!(LocalDay::of_ms(0).to_string(), "1970-01-01");
        assert_eq!(LocalMinute::of_ms(-8 * 3600 * 1000 - 1).to_string(), "1969-12-31T23:59");
    }

    #[test]
    fn day_parse_round_trips() {
        for z in [-800_000, -1, 0, 1, 19_000, 20_045, 2_000_000] {
            let day = LocalDay(z);
            assert_eq!(LocalDay::parse(&day.to_string()), Some(day), "{day}");
        }
        assert_eq!(LocalDay::parse("2024-13-01"), None);
    }

    #[test]
    fn total_on_extreme_timestamps() {
        let _ = LocalMinute::of_ms(i64::MAX).to_string();
        let _ = LocalMinute::of_ms(i64::MIN).to_string();
    }
}
