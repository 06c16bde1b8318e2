//! A latency-by-percentile plot (SVG) from `.hgrm` files, in the style of HdrHistogram's
//! plotter: x is 1/(1-percentile) on a log scale, y is latency.

use std::{fmt::Write as _, path::PathBuf};

use anyhow::Context;

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 520.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 180.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
/// Rightmost x: the 99.999th percentile.
const MAX_X: f64 = 100_000.0;
const COLOURS: [&str; 6] = [
    "#555555", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e",
];

/// (1/(1-q), latency in ms) points of an `.hgrm` file.
fn read_hgrm(path: &PathBuf) -> anyhow::Result<Vec<(f64, f64)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut points = Vec::new();
    for line in text.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() != 4 || cols[0].starts_with('#') {
            continue;
        }
        let (Ok(value), Ok(q)) = (cols[0].parse::<f64>(), cols[1].parse::<f64>()) else {
            continue;
        };
        if q < 1.0 {
            points.push(((1.0 / (1.0 - q)).min(MAX_X), value));
        }
    }
    Ok(points)
}

pub fn percentile_svg(series: &[(&str, PathBuf)], title: &str) -> anyhow::Result<String> {
    let data: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(n, p)| Ok((*n, read_hgrm(p)?)))
        .collect::<anyhow::Result<_>>()?;
    let max_ms = data
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.1))
        .fold(0.1f64, f64::max)
        * 1.1;
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |v: f64| LEFT + plot_w * v.max(1.0).log10() / MAX_X.log10();
    let y = |ms: f64| TOP + plot_h * (1.0 - ms / max_ms);
    let mut svg = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"28\" font-size=\"15\" text-anchor=\"middle\">{title}</text>\n", LEFT + plot_w / 2.0);
    for (i, label) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]
        .iter()
        .enumerate()
    {
        let xv = x(10f64.powi(i as i32));
        let _ = writeln!(svg, "<line x1=\"{xv:.1}\" y1=\"{TOP}\" x2=\"{xv:.1}\" y2=\"{:.1}\" stroke=\"#dddddd\"/><text x=\"{xv:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>", TOP + plot_h, TOP + plot_h + 18.0);
    }
    for i in 0..=5 {
        let ms = max_ms * i as f64 / 5.0;
        let yv = y(ms);
        let _ = writeln!(svg, "<line x1=\"{LEFT}\" y1=\"{yv:.1}\" x2=\"{:.1}\" y2=\"{yv:.1}\" stroke=\"#dddddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{ms:.2}</text>", LEFT + plot_w, LEFT - 6.0, yv + 4.0);
    }
    let _ = writeln!(
        svg,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">percentile</text>",
        LEFT + plot_w / 2.0,
        HEIGHT - 15.0
    );
    let _ = writeln!(svg, "<text transform=\"translate(22,{:.1}) rotate(-90)\" text-anchor=\"middle\">latency (ms)</text>", TOP + plot_h / 2.0);
    for (i, (name, pts)) in data.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|(px, py)| format!("{:.1},{:.1}", x(*px), y(*py)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        );
        let ly = TOP + 20.0 + 22.0 * i as f64;
        let lx = LEFT + plot_w + 20.0;
        let _ = writeln!(svg, "<line x1=\"{lx}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{colour}\" stroke-width=\"3\"/><text x=\"{}\" y=\"{}\">{name}</text>", lx + 24.0, lx + 30.0, ly + 4.0);
    }
    svg.push_str("</svg>\n");
    Ok(svg)
}
