//! Figures as people read them: digits grouped by thousands, durations in hours, minutes and
//! seconds.

/// 5242880 → "5,242,880".
pub fn grouped(n: u64) -> String {
    let mut digits = n.to_string();
    let mut out = String::new();
    while digits.len() > 3 {
        let tail = digits.split_off(digits.len() - 3);
        out = format!(",{tail}{out}");
    }
    format!("{digits}{out}")
}

/// 7300 → "2h01m".
pub fn fmt_duration(s: f64) -> String {
    let s = s.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_figures_read_easily() {
        assert_eq!(grouped(1_234_568), "1,234,568");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(5_242_880), "5,242,880");
        assert_eq!(fmt_duration(59.0), "59s");
        assert_eq!(fmt_duration(61.0), "1m01s");
        assert_eq!(fmt_duration(7300.0), "2h01m");
    }
}
