//! Kubernetes resource quantities ("500m", "2", "16Gi", "1e3") as thousandths of a unit, enough
//! for resourceFieldRef and node capacity. Rounds up, as the API server does for CPU.

pub fn milli(q: &str) -> Result<i64, String> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let (number, suffix) = match suffix.strip_prefix(['e', 'E']) {
        Some(exp)
            if !exp.is_empty()
                && exp
                    .trim_start_matches(['+', '-'])
                    .chars()
                    .all(|c| c.is_ascii_digit()) =>
        {
            let exp: i32 = exp.parse().map_err(|_| bad(q))?;
            let n: f64 = number.parse().map_err(|_| bad(q))?;
            return Ok(round_up(n * 10f64.powi(exp) * 1000.0));
        }
        _ => (number, suffix),
    };
    let n: f64 = number.parse().map_err(|_| bad(q))?;
    let factor: f64 = match suffix {
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        _ => return Err(bad(q)),
    };
    Ok(round_up(n * factor * 1000.0))
}

fn round_up(x: f64) -> i64 {
    // Quantities come from decimal text; shave float noise before rounding up.
    (x - 1e-6).ceil().max(0.0) as i64
}

fn bad(q: &str) -> String {
    format!("{q:?} is not a Kubernetes quantity")
}

#[cfg(test)]
mod tests {
    use super::milli;

    #[test]
    fn parses_the_usual_forms() {
        assert_eq!(milli("500m").unwrap(), 500);
        assert_eq!(milli("2").unwrap(), 2000);
        assert_eq!(milli("0.1").unwrap(), 100);
        assert_eq!(milli("1Ki").unwrap(), 1_024_000);
        assert_eq!(milli("16Gi").unwrap(), 16 * (1 << 30) * 1000);
        assert_eq!(milli("1e3").unwrap(), 1_000_000);
        assert_eq!(milli("1k").unwrap(), 1_000_000);
        assert!(milli("12 apples").is_err());
        assert!(milli("").is_err());
    }
}
