//! Medians, spreads and paired ratios, and numbers formatted as the report
//! writes them.
//!
//! Figures of one run are compared side by side: two variants measured in
//! the same rounds are paired round by round ([`paired`]), so a machine that
//! slows down for a while moves both and not their ratio.

/// The median (the mean of the middle two of an even count); NaN for none.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

pub fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NAN, f64::min)
}

pub fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NAN, f64::max)
}

/// `100 × (a / b − 1)` for each round: how much `a` differs from `b`, in
/// percent, paired by position.
pub fn paired(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(a, b)| 100.0 * (a / b - 1.0)).collect()
}

/// `100 × median(a) / median(b)`.
pub fn ratio(a: &[f64], b: &[f64]) -> f64 {
    100.0 * median(a) / median(b)
}

/// `value` with `decimals` decimals and, with `thousands`, a comma between
/// each three digits of its whole part (`12,345.6`).
pub fn number(value: f64, decimals: usize, thousands: bool) -> String {
    let plain = format!("{value:.decimals$}");
    if !thousands || !value.is_finite() {
        return plain;
    }
    let (sign, digits) = plain.strip_prefix('-').map_or(("", plain.as_str()), |rest| ("-", rest));
    let (whole, fraction) = digits.split_once('.').map_or((digits, None), |(w, f)| (w, Some(f)));
    let mut grouped = String::new();
    for (index, digit) in whole.chars().enumerate() {
        if index > 0 && (whole.len() - index) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    match fraction {
        Some(fraction) => format!("{sign}{grouped}.{fraction}"),
        None => format!("{sign}{grouped}"),
    }
}

/// Each of `values` as [`number`] gives it, joined by `", "`.
pub fn list(values: &[f64], decimals: usize, thousands: bool) -> String {
    values.iter().map(|v| number(*v, decimals, thousands)).collect::<Vec<_>>().join(", ")
}

/// "met" when `ok`, else "missed": a target's verdict.
pub fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "missed"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!((min(&[2.0, -1.0, 5.0]), max(&[2.0, -1.0, 5.0])), (-1.0, 5.0));
    }

    #[test]
    fn pairs_compare_round_by_round() {
        assert_eq!(paired(&[110.0, 90.0], &[100.0, 100.0]), [10.000000000000009, -9.999999999999998]);
        assert_eq!(ratio(&[50.0, 60.0, 70.0], &[100.0, 120.0, 140.0]), 50.0);
    }

    #[test]
    fn numbers_round_to_even_and_group_thousands() {
        assert_eq!(number(2.5, 0, false), "2");
        assert_eq!(number(3.5, 0, false), "4");
        assert_eq!(number(1234567.891, 1, true), "1,234,567.9");
        assert_eq!(number(-1234.0, 0, true), "-1,234");
        assert_eq!(number(999.0, 0, true), "999");
        assert_eq!(number(1000.0, 2, false), "1000.00");
        assert_eq!(list(&[1.0, 22.25, 3000.0], 1, true), "1.0, 22.2, 3,000.0");
        assert_eq!((verdict(true), verdict(false)), ("met", "missed"));
    }
}
