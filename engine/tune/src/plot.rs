//! The latency / memory / fidelity trade-off as a hand-written SVG scatter plot: x = measured p99
//! latency, y = top-1 agreement with the full model, circle area = peak memory; Pareto-optimal
//! candidates filled, the chosen one ringed, the board's deadline as a dashed line. A budget
//! recovered by distillation (`tune --recover`) also shows its recovered agreement: a green
//! square at the same latency, joined to the pruned model's circle by an arrow.
//! `accuracy_svg` draws the other view a budget is chosen on: accuracy against FLOPs per inference.

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
    let mut s = frame((w, h, l, r, t, b), title);
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

/// The SVG header of a `w` x `h` plot: white background, the title, and the x and y axes of the
/// plot area inside the margins `l`, `r`, `t`, `b`.
fn frame((w, h, l, r, t, b): (f64, f64, f64, f64, f64, f64), title: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{l}" y="22" font-size="14">{}</text>"#, esc(title));
    let _ = writeln!(
        s,
        r#"<line x1="{l}" y1="{0}" x2="{1}" y2="{0}" stroke="black"/><line x1="{l}" y1="{t}" x2="{l}" y2="{0}" stroke="black"/>"#,
        h - b,
        w - r
    );
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// SVG text of the accuracy / compute curve of `cands`: x = FLOPs per inference (log scale),
/// y = accuracy against the labels (top-1 agreement with the full model where there are no
/// labels), one point per (latents, blocks, precision) budget: blue circles pruned only, green
/// squares after recovery, each series' best-accuracy-for-its-cost frontier drawn as a line, and
/// the full model's accuracy as a dashed line.
pub fn accuracy_svg(cands: &[Measured], title: &str) -> String {
    let (w, h, l, r, t, b) = (720.0, 460.0, 70.0, 30.0, 52.0, 60.0);
    let with_labels = cands.iter().all(|c| c.fidelity.accuracy.is_some());
    let value = |f: &crate::Fidelity| 100.0 * if with_labels { f.accuracy.unwrap_or(0.0) } else { f.top1_agreement };
    // One point per budget: threads change neither the FLOPs nor the outputs.
    let mut pts: Vec<(String, f64, f64, Option<f64>)> = vec![];
    for c in cands {
        let k = c.candidate;
        let p = if k.precision == crate::Precision::F32.into() { String::new() } else { format!(" {}", k.precision) };
        let q = k.queries.map_or(String::new(), |q| format!(" Q{q}"));
        let name = format!("K{} B{}{p}{q}", k.latents, k.blocks);
        if !pts.iter().any(|p| p.0 == name) {
            pts.push((name, c.flops.max(1) as f64, value(&c.fidelity), c.recovered.as_ref().map(value)));
        }
    }
    let reference = cands
        .iter()
        .find_map(|c| if with_labels { c.fidelity.reference_accuracy.map(|a| 100.0 * a) } else { Some(100.0) })
        .unwrap_or(100.0);
    let ys = pts.iter().flat_map(|p| std::iter::once(p.2).chain(p.3));
    let ymin = ys.fold(reference, f64::min).min(reference - 5.0).max(0.0).floor();
    let ymax = (reference + 0.5).min(100.5).max(ymin + 1.0);
    let (lo, hi) = pts.iter().fold((f64::MAX, f64::MIN), |(a, z), p| (a.min(p.1), z.max(p.1)));
    let (lx0, lx1) = ((lo / 1.5).log10(), (hi * 1.5).log10().max((lo / 1.5).log10() + 0.1));
    let px = |x: f64| l + (x.log10() - lx0) / (lx1 - lx0) * (w - l - r);
    let py = |y: f64| t + (ymax - y) / (ymax - ymin) * (h - t - b);
    let mut s = frame((w, h, l, r, t, b), title);
    // Decade ticks and their 2x / 5x steps, in MFLOPs.
    let mut tick = 10f64.powf(lx0.floor());
    while tick <= 10f64.powf(lx1) {
        for m in [1.0, 2.0, 5.0] {
            let x = tick * m;
            if x.log10() >= lx0 && x.log10() <= lx1 {
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                    px(x),
                    h - b + 16.0,
                    fmt_mflops(x / 1e6)
                );
            }
        }
        tick *= 10.0;
    }
    let step = [0.5, 1.0, 2.0, 5.0, 10.0, 20.0].into_iter().find(|st| (ymax - ymin) / st <= 8.0).unwrap_or(25.0);
    let mut y = (ymin / step).ceil() * step;
    while y <= ymax.min(100.0) {
        let _ = writeln!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{y}</text>"#, l - 6.0, py(y) + 4.0);
        y += step;
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">MFLOPs per inference (log scale)</text>"#,
        (l + w - r) / 2.0,
        h - 20.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{0}" transform="rotate(-90 16 {0})" text-anchor="middle">{1}</text>"#,
        (t + h - b) / 2.0,
        if with_labels { "accuracy on the validation samples (%)" } else { "top-1 agreement with full model (%)" }
    );
    let _ = writeln!(
        s,
        r#"<line x1="{l}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="gray" stroke-dasharray="5,4"/><text x="{2}" y="{3:.1}" fill="gray" text-anchor="end">full model {reference:.2} %</text>"#,
        py(reference),
        w - r,
        w - r - 4.0,
        py(reference) - 4.0
    );
    // Frontier of a series: sorted by cost, each point kept when it beats every cheaper one.
    let frontier = |vals: Vec<(f64, f64)>, colour: &str, s: &mut String| {
        let mut v = vals;
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut best = f64::MIN;
        let line: Vec<String> = v
            .into_iter()
            .filter(|p| {
                let keep = p.1 > best;
                best = best.max(p.1);
                keep
            })
            .map(|p| format!("{:.1},{:.1}", px(p.0), py(p.1)))
            .collect();
        if line.len() > 1 {
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="1.5"/>"#,
                line.join(" ")
            );
        }
    };
    let recovered = pts.iter().any(|p| p.3.is_some());
    frontier(pts.iter().map(|p| (p.1, p.2)).collect(), "#1f77b4", &mut s);
    if recovered {
        frontier(pts.iter().map(|p| (p.1, p.3.unwrap_or(p.2))).collect(), "#2ca02c", &mut s);
    }
    for (name, x, y, rec) in &pts {
        let _ = writeln!(
            s,
            r##"<circle cx="{:.1}" cy="{:.1}" r="5" fill="#1f77b4" fill-opacity="0.6" stroke="#1f77b4"><title>{} {} MFLOPs: {y:.2} % pruned only</title></circle>"##,
            px(*x),
            py(*y),
            esc(name),
            fmt_mflops(x / 1e6)
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="10">{}</text>"#,
            px(*x) + 7.0,
            py(*y) + 12.0,
            esc(name)
        );
        if let Some(ry) = rec {
            let _ = writeln!(
                s,
                r##"<rect x="{:.1}" y="{:.1}" width="9" height="9" fill="#2ca02c"><title>{} {} MFLOPs: {ry:.2} % recovered</title></rect>"##,
                px(*x) - 4.5,
                py(*ry) - 4.5,
                esc(name),
                fmt_mflops(x / 1e6)
            );
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="{l}" y="{}" font-size="11">blue circles: pruned only{}; lines: best accuracy for the cost</text>"#,
        t - 4.0,
        if recovered { "; green squares: recovered by distillation" } else { "" }
    );
    s.push_str("</svg>\n");
    s
}

fn fmt_mflops(m: f64) -> String {
    if m >= 10.0 {
        format!("{m:.0}")
    } else if m >= 1.0 {
        format!("{m:.1}")
    } else {
        format!("{m:.2}")
    }
}
