//! Cron expressions and the instants they name in an IANA time zone: the
//! pure core of periodic tasks ([`super::periodic`]). Nothing here reads a
//! clock; every function takes the instant it starts from.
//!
//! Syntax: five fields, `minute hour day-of-month month day-of-week`, as in
//! crontab(5). Each field is `*`, a number, a range `a-b`, any of those
//! with a step (`*/15`, `8-18/2`, `5/10` = from 5 to the field's end), or
//! a comma-separated list of them. Months take `jan`..`dec` and weekdays
//! `sun`..`sat` (0 and 7 are both Sunday). When both day fields are
//! restricted (neither is `*`), a day matches if either does, as in Vixie
//! cron. `@yearly`, `@monthly`, `@weekly`, `@daily` (`@midnight`) and
//! `@hourly` stand for their usual expressions. An expression that names
//! no instant (`0 0 31 2 *`) is refused.
//!
//! # Daylight saving time
//!
//! The fields are read as the zone's wall clock. Where the wall clock is
//! not a line, two rules decide:
//!
//! 1. **A skipped local time** (the clock jumps forward over it) is read
//!    with the UTC offset in force *before* the jump, as RFC 5545 (§3.3.5)
//!    says. In Europe/Berlin on 2026-03-29 the clock goes from 02:00 CET to
//!    03:00 CEST: a daily `30 2 * * *` runs once that day, at 01:30 UTC
//!    (03:30 CEST), one hour of real time after 01:30 CET would have been.
//!    An hourly `30 * * * *` runs at 00:30 UTC (01:30 CET) and next at
//!    01:30 UTC (03:30 CEST): the skipped 02:30 lands on 03:30 and they are
//!    one occurrence, so that day has 23 hourly runs, one per real hour.
//! 2. **A repeated local time** (the clock goes back over it) names its
//!    first instant only, unless the hour field is `*` (every hour): then
//!    both. In Berlin on 2026-10-25 the clock goes from 03:00 CEST back to
//!    02:00 CET: a daily `30 2 * * *` runs once, at 00:30 UTC (02:30 CEST),
//!    and not again at 01:30 UTC (02:30 CET); an hourly `30 * * * *` runs
//!    at both, so that day has 25 hourly runs. This is Vixie cron's rule:
//!    a job at a fixed hour runs once a day, an hourly job once an hour.
//!
//! Both rules hold for any zone whose clock jumps by at most
//! [`MAX_CLOCK_JUMP`] at a time, which is every change in the tz database
//! since 2012.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeZone, Utc};
use chrono_tz::Tz;

/// The largest jump of a zone's wall clock the DST rules allow for.
pub const MAX_CLOCK_JUMP: Duration = Duration::hours(3);

/// How far ahead [`Cron::next_after`] looks: eight years and a bit, enough
/// for 29 February.
const SEARCH_DAYS: i64 = 366 * 8 + 2;

/// Why a cron expression was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cron expression {expression:?}: {reason}")]
pub struct CronError {
    /// The expression as given.
    pub expression: String,
    /// What is wrong with it.
    pub reason: String,
}

/// A parsed cron expression in a time zone.
#[derive(Clone, PartialEq, Eq)]
pub struct Cron {
    source: String,
    zone: Tz,
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    days_restricted: bool,
    weekdays_restricted: bool,
}

impl fmt::Debug for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cron({:?} in {})", self.source, self.zone)
    }
}

impl fmt::Display for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.source, self.zone)
    }
}

struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const MINUTE: Field = Field { name: "minute", min: 0, max: 59, names: &[] };
const HOUR: Field = Field { name: "hour", min: 0, max: 23, names: &[] };
const DAY: Field = Field { name: "day of month", min: 1, max: 31, names: &[] };
const MONTH: Field = Field {
    name: "month",
    min: 1,
    max: 12,
    names: &["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"],
};
// 7 is Sunday too; it is folded onto 0 after parsing.
const WEEKDAY: Field =
    Field { name: "day of week", min: 0, max: 7, names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"] };

impl Field {
    fn value(&self, text: &str) -> Result<u32, String> {
        let lower = text.to_ascii_lowercase();
        if let Some(i) = self.names.iter().position(|n| *n == lower) {
            return Ok(i as u32 + if self.min == 1 { 1 } else { 0 });
        }
        let n: u32 = text.parse().map_err(|_| format!("{}: {text:?} is not a number", self.name))?;
        if n < self.min || n > self.max {
            return Err(format!("{}: {n} is outside {}-{}", self.name, self.min, self.max));
        }
        Ok(n)
    }

    /// The set of values `text` names, as a bit mask, and whether it is `*`.
    fn parse(&self, text: &str) -> Result<(u64, bool), String> {
        let mut mask = 0u64;
        for item in text.split(',') {
            let (range, step) = match item.split_once('/') {
                Some((range, step)) => {
                    let step: u32 =
                        step.parse().map_err(|_| format!("{}: step {step:?} is not a number", self.name))?;
                    if step == 0 || step > self.max {
                        return Err(format!("{}: step {step} is outside 1-{}", self.name, self.max));
                    }
                    (range, Some(step))
                }
                None => (item, None),
            };
            let (low, high) = if range == "*" {
                (self.min, self.max)
            } else if let Some((a, b)) = range.split_once('-') {
                let (a, b) = (self.value(a)?, self.value(b)?);
                if a > b {
                    return Err(format!("{}: range {a}-{b} runs backwards", self.name));
                }
                (a, b)
            } else {
                let a = self.value(range)?;
                (a, if step.is_some() { self.max } else { a })
            };
            for v in (low..=high).step_by(step.unwrap_or(1) as usize) {
                mask |= 1 << v;
            }
        }
        Ok((mask, text == "*"))
    }
}

fn bits(mask: u64) -> impl Iterator<Item = u32> {
    (0..64).filter(move |b| mask & (1 << b) != 0)
}

impl Cron {
    /// Parses `expression` (see the module) for the wall clock of `zone`.
    pub fn parse(expression: &str, zone: Tz) -> Result<Self, CronError> {
        let error = |reason: String| CronError { expression: expression.to_owned(), reason };
        let expanded = match expression.trim() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other if other.starts_with('@') => return Err(error(format!("unknown macro {other}"))),
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let [minute, hour, day, month, weekday] = fields[..] else {
            return Err(error(format!(
                "has {} fields; five are needed: minute hour day-of-month month day-of-week",
                fields.len()
            )));
        };
        let (minutes, _) = MINUTE.parse(minute).map_err(error)?;
        let (hours, _) = HOUR.parse(hour).map_err(error)?;
        let (days, any_day) = DAY.parse(day).map_err(error)?;
        let (months, _) = MONTH.parse(month).map_err(error)?;
        let (mut weekdays, any_weekday) = WEEKDAY.parse(weekday).map_err(error)?;
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays | 1) & 0x7f;
        }
        let cron = Self {
            source: expression.trim().to_owned(),
            zone,
            minutes,
            hours: hours as u32,
            days: days as u32,
            months: months as u16,
            weekdays: weekdays as u8,
            days_restricted: !any_day,
            weekdays_restricted: !any_weekday,
        };
        // Any fixed start will do: the search covers every kind of year.
        let start = DateTime::<Utc>::from_timestamp(1_704_067_200, 0).unwrap_or_default();
        if cron.next_after(start).is_none() {
            return Err(error("names no day that exists".into()));
        }
        Ok(cron)
    }

    /// The expression as given.
    pub fn expression(&self) -> &str {
        &self.source
    }

    /// The time zone its fields are read in.
    pub fn zone(&self) -> Tz {
        self.zone
    }

    fn every_hour(&self) -> bool {
        self.hours == (1 << 24) - 1
    }

    fn date_matches(&self, date: NaiveDate) -> bool {
        if self.months & (1 << date.month()) == 0 {
            return false;
        }
        let day = self.days & (1 << date.day()) != 0;
        let weekday = self.weekdays & (1 << date.weekday().num_days_from_sunday()) != 0;
        match (self.days_restricted, self.weekdays_restricted) {
            (true, true) => day || weekday,
            (true, false) => day,
            (false, true) => weekday,
            (false, false) => true,
        }
    }

    /// The instants a wall-clock time names, by the module's DST rules.
    fn instants(&self, local: NaiveDateTime) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
        match self.zone.from_local_datetime(&local) {
            LocalResult::Single(at) => (Some(at.with_timezone(&Utc)), None),
            LocalResult::Ambiguous(a, b) => {
                let (first, second) = if a <= b { (a, b) } else { (b, a) };
                (Some(first.with_timezone(&Utc)), self.every_hour().then(|| second.with_timezone(&Utc)))
            }
            LocalResult::None => {
                (self.offset_before_gap(local).map(|offset| local - offset).map(|t| t.and_utc()), None)
            }
        }
    }

    /// The UTC offset in force just before the gap `local` falls in.
    fn offset_before_gap(&self, local: NaiveDateTime) -> Option<Duration> {
        [MAX_CLOCK_JUMP, Duration::days(1), Duration::days(2)].into_iter().find_map(|back| {
            let before = self.zone.from_local_datetime(&(local - back)).latest()?;
            Some(Duration::seconds(i64::from(before.offset().fix().local_minus_utc())))
        })
    }

    /// The first instant after `after` that the expression names, if any
    /// within eight years.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local_after = after.with_timezone(&self.zone).naive_local();
        // A wall-clock time up to one jump earlier can name a later instant.
        let earliest_local = local_after - MAX_CLOCK_JUMP;
        let mut best: Option<(DateTime<Utc>, NaiveDateTime)> = None;
        let mut date = earliest_local.date();
        let last = date + Duration::days(SEARCH_DAYS);
        while date <= last {
            if let Some((_, found_local)) = best {
                // Later wall-clock times name later instants, give or take a jump.
                if date.and_hms_opt(0, 0, 0)? > found_local + MAX_CLOCK_JUMP {
                    break;
                }
            }
            if self.date_matches(date) {
                for hour in bits(u64::from(self.hours)) {
                    for minute in bits(self.minutes) {
                        let local = date.and_hms_opt(hour, minute, 0)?;
                        if local < earliest_local {
                            continue;
                        }
                        if let Some((_, found_local)) = best {
                            if local > found_local + MAX_CLOCK_JUMP {
                                break;
                            }
                        }
                        let (first, second) = self.instants(local);
                        for at in [first, second].into_iter().flatten() {
                            if at > after && best.map_or(true, |(b, _)| at < b) {
                                best = Some((at, local));
                            }
                        }
                    }
                }
            }
            date = date.succ_opt()?;
        }
        best.map(|(at, _)| at)
    }
}

impl FromStr for Cron {
    type Err = CronError;

    /// An expression in UTC.
    fn from_str(expression: &str) -> Result<Self, CronError> {
        Self::parse(expression, Tz::UTC)
    }
}

#[cfg(test)]
mod tests {
    use chrono::Timelike;
    use chrono_tz::Europe::Berlin;

    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).expect("test instant").with_timezone(&Utc)
    }

    fn cron(expression: &str, zone: Tz) -> Cron {
        Cron::parse(expression, zone).expect("valid expression")
    }

    /// Every instant in `[from, to)`.
    fn between(cron: &Cron, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut at = from - Duration::seconds(1);
        while let Some(next) = cron.next_after(at).filter(|n| *n < to) {
            assert!(next > at, "{cron:?}: {next} does not follow {at}");
            out.push(next);
            at = next;
        }
        out
    }

    #[test]
    fn refuses_what_is_not_an_expression_with_the_reason() {
        for (text, reason) in [
            ("* * * *", "has 4 fields"),
            ("60 * * * *", "minute: 60 is outside 0-59"),
            ("* 24 * * *", "hour: 24 is outside 0-23"),
            ("* * 0 * *", "day of month: 0 is outside 1-31"),
            ("* * * 13 *", "month: 13 is outside 1-12"),
            ("* * * * 8", "day of week: 8 is outside 0-7"),
            ("*/0 * * * *", "step 0 is outside"),
            ("5-1 * * * *", "runs backwards"),
            ("x * * * *", "\"x\" is not a number"),
            ("0 0 31 2 *", "names no day that exists"),
            ("0 0 30 feb *", "names no day that exists"),
            ("@fortnightly", "unknown macro"),
            ("", "has 0 fields"),
        ] {
            let error = Cron::parse(text, Tz::UTC).expect_err(text);
            assert!(error.to_string().contains(reason), "{text:?}: {error}");
        }
    }

    #[test]
    fn fields_take_lists_ranges_steps_and_names() {
        let c = cron("0,30 8-18/2 * jan-mar mon-fri", Tz::UTC);
        assert_eq!(bits(c.minutes).collect::<Vec<_>>(), [0, 30]);
        assert_eq!(bits(u64::from(c.hours)).collect::<Vec<_>>(), [8, 10, 12, 14, 16, 18]);
        assert_eq!(bits(u64::from(c.months)).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(bits(u64::from(c.weekdays)).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        assert_eq!(bits(cron("5/20 * * * *", Tz::UTC).minutes).collect::<Vec<_>>(), [5, 25, 45]);
        assert_eq!(cron("0 0 * * 7", Tz::UTC).weekdays, 1, "7 is Sunday");
        assert_eq!(cron("@daily", Tz::UTC), Cron { source: "@daily".into(), ..cron("0 0 * * *", Tz::UTC) });
    }

    /// Against a minute-by-minute scan of 2026 in zones without DST (UTC,
    /// Asia/Kolkata at +05:30): the search finds exactly the minutes whose
    /// wall clock matches.
    #[test]
    fn without_dst_it_names_exactly_the_matching_minutes() {
        let expressions = [
            "* * * * *",
            "*/7 * * * *",
            "0 */5 * * *",
            "15 10 * * 1-5",
            "0 0 13 * 5",
            "0 0 29 2 *",
            "59 23 31 * *",
            "0 12 1,15 * 0",
            "30 2 * 3,10 *",
        ];
        let (from, to) = (utc("2026-01-01T00:00:00Z"), utc("2026-03-01T00:00:00Z"));
        for zone in [Tz::UTC, chrono_tz::Asia::Kolkata] {
            for expression in expressions {
                let c = cron(expression, zone);
                let mut expected = Vec::new();
                let mut at = from;
                while at < to {
                    let local = at.with_timezone(&zone);
                    let day = c.days & (1 << local.day()) != 0;
                    let weekday = c.weekdays & (1 << local.weekday().num_days_from_sunday()) != 0;
                    let date_ok = c.months & (1 << local.month()) != 0
                        && match (c.days_restricted, c.weekdays_restricted) {
                            (true, true) => day || weekday,
                            (true, false) => day,
                            (false, true) => weekday,
                            (false, false) => true,
                        };
                    if date_ok && c.hours & (1 << local.hour()) != 0 && c.minutes & (1 << local.minute()) != 0
                    {
                        expected.push(at);
                    }
                    at += Duration::minutes(1);
                }
                assert_eq!(between(&c, from, to), expected, "{expression} in {zone}");
            }
        }
        // Leap days are years apart and still found.
        let leap = cron("0 0 29 2 *", Tz::UTC);
        assert_eq!(leap.next_after(utc("2026-01-01T00:00:00Z")), Some(utc("2028-02-29T00:00:00Z")));
    }

    /// Rule 1, on the day Berlin skips from 02:00 CET to 03:00 CEST.
    #[test]
    fn berlin_spring_forward_2026_03_29() {
        let daily = cron("30 2 * * *", Berlin);
        let first = daily.next_after(utc("2026-03-28T12:00:00Z"));
        assert_eq!(first, Some(utc("2026-03-29T01:30:00Z")), "once, at 03:30 CEST");
        assert_eq!(daily.next_after(utc("2026-03-29T01:30:00Z")), Some(utc("2026-03-30T00:30:00Z")));

        // The local day 00:00 CET to 24:00 CEST is 23 hours of real time.
        let (day_start, day_end) = (utc("2026-03-28T23:00:00Z"), utc("2026-03-29T22:00:00Z"));
        let hourly = between(&cron("30 * * * *", Berlin), day_start, day_end);
        assert_eq!(hourly.len(), 23);
        assert_eq!(
            hourly[..3],
            [utc("2026-03-28T23:30:00Z"), utc("2026-03-29T00:30:00Z"), utc("2026-03-29T01:30:00Z")]
        );
        assert!(hourly.windows(2).all(|w| w[1] - w[0] == Duration::hours(1)), "{hourly:?}");

        // Every quarter of the skipped hour lands on the hour after it.
        let quarters = between(&cron("*/15 2 * * *", Berlin), day_start, day_end);
        let expected: Vec<_> = ["01:00", "01:15", "01:30", "01:45"]
            .iter()
            .map(|t| utc(&format!("2026-03-29T{t}:00Z")))
            .collect();
        assert_eq!(quarters, expected);
    }

    /// Rule 2, on the day Berlin goes back from 03:00 CEST to 02:00 CET.
    #[test]
    fn berlin_fall_back_2026_10_25() {
        let daily = cron("30 2 * * *", Berlin);
        assert_eq!(
            daily.next_after(utc("2026-10-24T12:00:00Z")),
            Some(utc("2026-10-25T00:30:00Z")),
            "02:30 CEST"
        );
        assert_eq!(
            daily.next_after(utc("2026-10-25T00:30:00Z")),
            Some(utc("2026-10-26T01:30:00Z")),
            "not again at 02:30 CET"
        );

        // The local day is 25 hours of real time.
        let (day_start, day_end) = (utc("2026-10-24T22:00:00Z"), utc("2026-10-25T23:00:00Z"));
        let hourly = between(&cron("30 * * * *", Berlin), day_start, day_end);
        assert_eq!(hourly.len(), 25);
        assert!(
            hourly.contains(&utc("2026-10-25T00:30:00Z")) && hourly.contains(&utc("2026-10-25T01:30:00Z"))
        );
        assert!(hourly.windows(2).all(|w| w[1] - w[0] == Duration::hours(1)), "{hourly:?}");

        let quarters = between(&cron("*/15 2 * * *", Berlin), day_start, day_end);
        let expected: Vec<_> = ["00:00", "00:15", "00:30", "00:45"]
            .iter()
            .map(|t| utc(&format!("2026-10-25T{t}:00Z")))
            .collect();
        assert_eq!(quarters, expected, "the first 02:xx only");
    }

    /// Over Berlin's whole local year 2026, both changes included: one run
    /// per real hour, one per day for a fixed hour, every instant later
    /// than the one before.
    #[test]
    fn berlin_2026_counts_one_run_per_hour_and_per_day() {
        let (from, to) = (utc("2025-12-31T23:00:00Z"), utc("2026-12-31T23:00:00Z"));
        for (expression, runs) in
            [("0 * * * *", 8760), ("30 2 * * *", 365), ("*/15 2 * * *", 365 * 4), ("0 3 * * sun", 52)]
        {
            assert_eq!(between(&cron(expression, Berlin), from, to).len(), runs, "{expression}");
        }
    }
}
