//! Line charts as standalone SVG (no plotting dependency): training-loss curves, one line
//! per run, as in the paper's Figure 2.

use std::fmt::Write;

/// One named line of (x, y) points.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: &'a [(f64, f64)],
}

const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 400.0;
const MARGIN: f64 = 56.0;

/// An SVG line chart of `series` with labelled axes (their ranges) and a legend.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let points = series.iter().flat_map(|s| s.points.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    // A flat range still needs a height to draw in.
    let (x1, y1) = (if x1 > x0 { x1 } else { x0 + 1.0 }, if y1 > y0 { y1 } else { y0 + 1.0 });
    let px = |x: f64| MARGIN + (x - x0) / (x1 - x0) * (WIDTH - 2.0 * MARGIN);
    let py = |y: f64| HEIGHT - MARGIN - (y - y0) / (y1 - y0) * (HEIGHT - 2.0 * MARGIN);

    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="20" text-anchor="middle" font-size="14">{}</text>
<line x1="{MARGIN}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/>
<line x1="{MARGIN}" y1="{MARGIN}" x2="{MARGIN}" y2="{b}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text x="14" y="{}" text-anchor="middle" transform="rotate(-90 14 {})">{}</text>
<text x="{MARGIN}" y="{}" text-anchor="middle">{}</text><text x="{r}" y="{}" text-anchor="middle">{}</text>
<text x="{}" y="{b}" text-anchor="end">{}</text><text x="{}" y="{}" text-anchor="end">{}</text>
"#,
        WIDTH / 2.0,
        escape(title),
        WIDTH / 2.0,
        HEIGHT - 10.0,
        escape(x_label),
        HEIGHT / 2.0,
        HEIGHT / 2.0,
        escape(y_label),
        HEIGHT - MARGIN + 16.0,
        number(x0),
        HEIGHT - MARGIN + 16.0,
        number(x1),
        MARGIN - 4.0,
        number(y0),
        MARGIN - 4.0,
        MARGIN + 4.0,
        number(y1),
        b = HEIGHT - MARGIN,
        r = WIDTH - MARGIN,
    );
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(svg, r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#, path.join(" "));
        let ly = MARGIN + 16.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            WIDTH - MARGIN - 150.0,
            WIDTH - MARGIN - 130.0,
            WIDTH - MARGIN - 125.0,
            ly + 4.0,
            escape(s.name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn number(v: f64) -> String {
    if v.abs() >= 1000.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_series_within_the_frame() {
        let a = [(1.0, 2.5), (2.0, 1.5), (3.0, 1.0)];
        let b = [(1.0, 2.0), (3.0, f64::NAN)];
        let svg = line_chart("loss <train>", "step", "loss", &[Series { name: "grape", points: &a }, Series { name: "lowest", points: &b }]);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("loss &lt;train&gt;") && svg.contains(">grape<") && svg.contains(">lowest<"));
        // The lowest loss sits on the bottom axis, the highest on the top one.
        assert!(svg.contains(&format!("{:.1},{:.1}", WIDTH - MARGIN, HEIGHT - MARGIN)));
        assert!(svg.contains(&format!("{:.1},{:.1}", MARGIN, MARGIN)));
        assert!(!svg.contains("NaN"));
    }
}
