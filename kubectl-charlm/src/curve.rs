//! A loss curve in a few lines of a terminal: block characters in eighths of a row, the x axis in
//! steps. `status.lossHistory` is thinned unevenly (old points coarser than new ones), so the
//! columns are placed by step, not by point, and filled between points by linear interpolation.

use charlm_api::LossPoint;

const EIGHTHS: [char; 9] = [' ', '▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// The curve as `rows` lines of `width` columns with the highest and lowest loss on the left, and
/// a last line with the first and last step; `None` for fewer than two distinct steps.
pub fn plot(points: &[LossPoint], width: usize, rows: usize) -> Option<Vec<String>> {
    let (first, last) = (points.first()?, points.last()?);
    if last.step <= first.step || width < 2 || rows == 0 {
        return None;
    }
    let values: Vec<f64> = (0..width)
        .map(|c| {
            let step =
                first.step as f64 + (last.step - first.step) as f64 * c as f64 / (width - 1) as f64;
            at(points, step)
        })
        .collect();
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let span = (hi - lo).max(f64::EPSILON);
    // A flat curve still shows as one row of the lowest block rather than nothing.
    let levels: Vec<usize> = values
        .iter()
        .map(|v| 1 + ((v - lo) / span * (rows * 8 - 1) as f64).round() as usize)
        .collect();
    let label = |v: f64| format!("{v:>7.4}");
    let mut lines = Vec::with_capacity(rows + 1);
    for row in 0..rows {
        // Row 0 is the top; it holds levels above (rows - 1) * 8.
        let floor = (rows - 1 - row) * 8;
        let bar: String = levels
            .iter()
            .map(|&l| EIGHTHS[l.saturating_sub(floor).min(8)])
            .collect();
        let axis = match row {
            0 => label(hi),
            r if r == rows - 1 => label(lo),
            _ => " ".repeat(7),
        };
        lines.push(format!("{axis} ┤{bar}"));
    }
    let (a, b) = (first.step.to_string(), last.step.to_string());
    let gap = width.saturating_sub(a.len() + b.len()).max(1);
    lines.push(format!("{} step {a}{}{b}", " ".repeat(3), " ".repeat(gap)));
    Some(lines)
}

/// The loss at `step`, on the straight line between the points around it.
fn at(points: &[LossPoint], step: f64) -> f64 {
    let after = points.partition_point(|p| (p.step as f64) < step);
    match (after.checked_sub(1).map(|i| points[i]), points.get(after)) {
        (Some(a), Some(b)) if b.step > a.step => {
            let t = (step - a.step as f64) / (b.step - a.step) as f64;
            a.loss + (b.loss - a.loss) * t
        }
        (_, Some(b)) => b.loss,
        (Some(a), None) => a.loss,
        (None, None) => f64::NAN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(v: &[(i64, f64)]) -> Vec<LossPoint> {
        v.iter()
            .map(|&(step, loss)| LossPoint { step, loss })
            .collect()
    }

    #[test]
    fn a_falling_loss_falls_from_left_to_right() {
        let lines = plot(&points(&[(0, 3.0), (100, 2.0), (200, 1.0)]), 9, 3).unwrap();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], " 3.0000 ┤█▅▂      ");
        assert_eq!(lines[1], "        ┤███▇▅▂   ");
        assert_eq!(lines[2], " 1.0000 ┤██████▇▄▁");
        assert_eq!(
            lines[3], "    step 0     200",
            "the steps under the first and last columns"
        );
    }

    #[test]
    fn columns_follow_steps_not_points() {
        // Dense points late in the run must not stretch the end: at mid-run the line is halfway.
        let lines = plot(
            &points(&[
                (0, 2.0),
                (100, 1.0),
                (101, 1.0),
                (102, 1.0),
                (103, 1.0),
                (200, 0.0),
            ]),
            3,
            1,
        )
        .unwrap();
        assert_eq!(lines[0], " 2.0000 ┤█▅▁");
    }

    #[test]
    fn too_few_points_give_no_plot() {
        assert!(plot(&[], 20, 3).is_none());
        assert!(plot(&points(&[(5, 1.0)]), 20, 3).is_none());
        assert!(plot(&points(&[(5, 1.0), (5, 2.0)]), 20, 3).is_none());
    }

    #[test]
    fn a_flat_loss_is_one_low_row() {
        let lines = plot(&points(&[(0, 1.5), (10, 1.5)]), 4, 2).unwrap();
        assert_eq!(lines[0], " 1.5000 ┤    ");
        assert_eq!(lines[1], " 1.5000 ┤▁▁▁▁");
    }
}
