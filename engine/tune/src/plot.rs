//! The latency / memory / fidelity trade-off as a hand-written SVG scatter plot: x = measured p99
//! latency, y = top-1 agreement with the full model, circle area = peak memory; Pareto-optimal
//! candidates filled, the chosen one ringed, the board's deadline as a dashed line. A budget
//! recovered by distillation (`tune --recover`) also shows its recovered agreement: a green
//! square at the same latency, joined to the pruned model's circle by an arrow.

use crate::Measured;
use std::fmt::Write;

/// SVG text of the trade-off plot of `cands` (`chosen` indexes into them).
pub fn svg(cands: &[Measured], chosen: Option<usize>, deadline_ms: f64, title: &str) -> String {
    let (w, h, l, r, t, b) = (720.0, 460.0, 70.0, 30.0, 40.0, 60.0);
    let xs: Vec<f64> = cands.iter().map(|c| c.p99_ms).collect();
    let ys: Vec<f64> = cands.iter().map(|c| 100.0 * c.fidelity.top1_agreement).collect();
    let mems: Vec<f64> = cands.iter().map(|c| c.memory_bytes as f64).collect();
    let xmax = xs.iter().copied().fold(1e-6, f64::max) * 1.1;
    let rec: Vec<Option<f64>> = cands.iter().map(|c| c.recovered.as_ref().map(|r| 100.0 * r.top1_agreement)).collect();
    let ymin = ys.iter().chain(rec.iter().flatten()).copied().fold(100.0, f64::min).min(90.0).floor();
    let mmax = mems.iter().copied().fold(1.0, f64::max);
    let px = |x: f64| l + (x / xmax) * (w - l - r);
    let py = |y: f64| t + (100.5 - y) / (100.5 - ymin) * (h - t - b);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{l}" y="22" font-size="14">{}</text>"#, esc(title));
    let _ = writeln!(
        s,
        r#"<line x1="{l}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{l}" y1="{t}" x2="{l}" y2="{}" stroke="black"/>"#,
        h - b,
        w - r,
        h - b,
        h - b
    );
    for i in 0..=5 {
        let x = xmax * i as f64 / 5.0;
        let _ = writeln!(s, r#"<text x="{:.1}" y="{}" text-anchor="middle">{:.3}</text>"#, px(x), h - b + 16.0, x);
        let y = ymin + (100.0 - ymin) * i as f64 / 5.0;
        let _ = writeln!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{:.1}</text>"#, l - 6.0, py(y) + 4.0, y);
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">p99 latency on this host (ms)</text>"#,
        (l + w - r) / 2.0,
        h - 20.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">top-1 agreement with full model (%)</text>"#,
        (t + h - b) / 2.0,
        (t + h - b) / 2.0
    );
    if deadline_ms < xmax {
        let _ = writeln!(
            s,
            r#"<line x1="{0:.1}" y1="{t}" x2="{0:.1}" y2="{1}" stroke="red" stroke-dasharray="5,4"/><text x="{2:.1}" y="{3}" fill="red">deadline {deadline_ms} ms</text>"#,
            px(deadline_ms),
            h - b,
            px(deadline_ms) + 4.0,
            t + 12.0
        );
    }
    for (i, c) in cands.iter().enumerate() {
        let rad = 4.0 + 12.0 * (mems[i] / mmax).sqrt();
        let fill = if c.pareto { "#1f77b4" } else { "none" };
        let _ = writeln!(
            s,
            r##"<circle cx="{:.1}" cy="{:.1}" r="{rad:.1}" fill="{fill}" fill-opacity="0.6" stroke="#1f77b4"><title>{} p99 {:.3} ms, {:.2} MiB</title></circle>"##,
            px(xs[i]),
            py(ys[i]),
            esc(&c.label()),
            xs[i],
            mems[i] / 1048576.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="10">{}</text>"#,
            px(xs[i]) + rad + 2.0,
            py(ys[i]) - 2.0,
            esc(&c.label())
        );
        if let Some(y) = rec[i] {
            let _ = writeln!(
                s,
                r##"<line x1="{0:.1}" y1="{1:.1}" x2="{0:.1}" y2="{2:.1}" stroke="#2ca02c" stroke-width="1.5" stroke-dasharray="3,2"/>"##,
                px(xs[i]),
                py(ys[i]),
                py(y)
            );
            let _ = writeln!(
                s,
                r##"<rect x="{:.1}" y="{:.1}" width="9" height="9" fill="#2ca02c"><title>{} recovered: top-1 {:.2} % (pruned {:.2} %)</title></rect>"##,
                px(xs[i]) - 4.5,
                py(y) - 4.5,
                esc(&c.label()),
                y,
                ys[i]
            );
        }
        let ring_y = if c.recovered.is_some() { rec[i].unwrap_or(ys[i]) } else { ys[i] };
        if Some(i) == chosen {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="{:.1}" fill="none" stroke="green" stroke-width="3"/>"#,
                px(xs[i]),
                py(ring_y),
                rad + 5.0
            );
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" font-size="11">filled: Pareto-optimal; ring: chosen; circle area: peak heap{}</text>"#,
        w - r - if rec.iter().any(Option::is_some) { 520.0 } else { 330.0 },
        h - b - 8.0,
        if rec.iter().any(Option::is_some) { "; green square: after recovery" } else { "" }
    );
    s.push_str("</svg>\n");
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
