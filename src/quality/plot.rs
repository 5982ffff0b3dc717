//! The report's PNG: risk distributions per label (left) and ROC curves per language
//! (right), with the headline figures on top. plotters draws into an RGB buffer and `png`
//! encodes it; the one font (DejaVu Sans Mono, free licence, see NOTICE) is compiled in so
//! the picture looks the same on every machine.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;

use super::report::Report;
use super::Item;
use crate::evaluate::metrics::{roc_auc, roc_curve};

const W: u32 = 1400;
const H: u32 = 640;
const FONT: &str = "charter-mono";
static FONT_BYTES: &[u8] = include_bytes!("DejaVuSansMono.ttf");

fn register_font() -> Result<(), String> {
    static ONCE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES)
            .map_err(|_| "the embedded font is invalid".to_string())
    })
    .clone()
}

/// Share of `values` in each of `bins` equal bins over [lo, hi] (values outside are
/// counted in the end bins), as a step line.
fn histogram(values: &[f32], lo: f32, hi: f32, bins: usize) -> Vec<(f32, f32)> {
    let mut counts = vec![0usize; bins];
    let width = (hi - lo) / bins as f32;
    for &v in values {
        let b = (((v - lo) / width).floor().max(0.0) as usize).min(bins - 1);
        counts[b] += 1;
    }
    let n = values.len().max(1) as f32;
    let mut points = vec![(lo, 0.0)];
    for (b, &c) in counts.iter().enumerate() {
        let y = c as f32 / n;
        points.push((lo + b as f32 * width, y));
        points.push((lo + (b + 1) as f32 * width, y));
    }
    points.push((hi, 0.0));
    points
}

fn quantile(values: &[f32], q: f64) -> f32 {
    let mut v = values.to_vec();
    v.sort_by(f32::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Draws the report picture and writes it as a PNG.
pub fn write_png(
    path: &Path,
    report: &Report,
    items: &[Item],
    risks: &[f32],
) -> Result<(), String> {
    register_font()?;
    let mut buf = vec![255u8; (W * H * 3) as usize];
    draw(&mut buf, report, items, risks).map_err(|e| format!("drawing failed: {e}"))?;
    let file = std::fs::File::create(path).map_err(|e| e.to_string())?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), W, H);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(&buf).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw(buf: &mut [u8], report: &Report, items: &[Item], risks: &[f32]) -> DrawResult {
    let root = BitMapBackend::with_buffer(buf, (W, H)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, body) = root.split_vertically(70);
    let a = &report.at_thresholds;
    let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.3}"));
    let title = format!(
        "{} on {} ({} scorer), constitution {} {}: {} items, {}",
        report.data.path,
        report.model,
        report.scorer,
        report.constitution,
        report.version,
        report.data.items,
        report.cross_validation
    );
    let figures = format!(
        "ROC-AUC {}   at thresholds: precision {:.3}  recall {:.3}  F1 {:.3}  FPR {:.3}  safe-but-scary FPR {:.3}   {:.0} texts/s",
        f(report.auc.overall),
        a.overall.precision,
        a.overall.recall,
        a.overall.f1,
        a.overall.false_positive_rate,
        a.scary_false_positive_rate,
        report.throughput.texts_per_sec
    );
    let figures = match &report.ordinary {
        None => figures,
        Some(o) => format!(
            "{figures}   ordinary false alarms {:.3}{}",
            o.false_positive_rate,
            o.by_lang
                .iter()
                .map(|(k, a)| format!(" {k} {:.3}", a.false_positive_rate))
                .collect::<String>()
        ),
    };
    top.draw_text(&title, &(FONT, 15).into_font().color(&BLACK), (12, 10))?;
    top.draw_text(&figures, &(FONT, 15).into_font().color(&BLACK), (12, 38))?;
    let panels = body.split_evenly((1, 2));

    draw_risks(&panels[0], items, risks)?;
    draw_roc(&panels[1], report, items, risks)?;
    root.present()?;
    Ok(())
}

/// The left panel: where each kind of item falls on the risk axis.
fn draw_risks(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    items: &[Item],
    risks: &[f32],
) -> DrawResult {
    // Left: where each kind of item falls on the risk axis; the verdict is fail right of 0.
    let lo = quantile(risks, 0.005).min(-0.05);
    let hi = quantile(risks, 0.995).max(0.05);
    type Pick = Box<dyn Fn(&Item) -> bool>;
    type Series = (String, RGBColor, Vec<(f32, f32)>);
    let classes: [(&str, RGBColor, Pick); 4] = [
        (
            "violation",
            RGBColor(200, 30, 30),
            Box::new(|i| i.violation()),
        ),
        (
            "ok",
            RGBColor(30, 90, 200),
            Box::new(|i| !i.violation() && !i.scary() && !i.ordinary),
        ),
        (
            "ordinary traffic",
            RGBColor(30, 150, 60),
            Box::new(|i| i.ordinary),
        ),
        (
            "ok, safe-but-scary",
            RGBColor(230, 140, 0),
            Box::new(|i| i.scary() && !i.ordinary),
        ),
    ];
    let series: Vec<Series> = classes
        .iter()
        .map(|(name, color, pick)| {
            let v: Vec<f32> = items
                .iter()
                .zip(risks)
                .filter(|(i, _)| pick(i))
                .map(|(_, &r)| r)
                .collect();
            (
                format!("{name} ({})", v.len()),
                *color,
                histogram(&v, lo, hi, 40),
            )
        })
        .collect();
    let ymax = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .fold(0.0f32, f32::max)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "Risk by label (verdict fail right of 0)",
            (FONT, 18).into_font(),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(lo..hi, 0f32..ymax.max(0.01))?;
    chart
        .configure_mesh()
        .x_desc("risk = best rule score - its threshold")
        .y_desc("share of the label's items")
        .label_style((FONT, 13))
        .draw()?;
    for (name, color, points) in series {
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart.draw_series(LineSeries::new(
        vec![(0.0, 0.0), (0.0, ymax)],
        BLACK.stroke_width(1),
    ))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 13))
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()?;

    Ok(())
}

/// The right panel: ROC curves of the headline items, all and each language, with the
/// operating point of the thresholds in force.
fn draw_roc(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    report: &Report,
    items: &[Item],
    risks: &[f32],
) -> DrawResult {
    // Right: ROC curves, all items and each language.
    let mut chart = ChartBuilder::on(area)
        .caption("ROC curves", (FONT, 18).into_font())
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc("false-positive rate")
        .y_desc("true-positive rate (recall)")
        .label_style((FONT, 13))
        .draw()?;
    chart.draw_series(LineSeries::new(
        vec![(0.0, 0.0), (1.0, 1.0)],
        RGBColor(180, 180, 180).stroke_width(1),
    ))?;
    // The headline items only: the first labelled file's (as the figures above).
    let primary = std::path::Path::new(&report.data.path)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (items, risks): (Vec<&Item>, Vec<f32>) = items
        .iter()
        .zip(risks)
        .filter(|(i, _)| !i.ordinary && i.set == primary)
        .map(|(i, &r)| (i, r))
        .unzip();
    let risks = &risks[..];
    let positive: Vec<bool> = items.iter().map(|i| i.violation()).collect();
    let mut curves = vec![("all".to_string(), risks.to_vec(), positive.clone())];
    let langs: std::collections::BTreeSet<&str> = items.iter().map(|i| i.lang.as_str()).collect();
    for lang in langs {
        let (s, p): (Vec<f32>, Vec<bool>) = items
            .iter()
            .zip(risks)
            .filter(|(i, _)| i.lang == lang)
            .map(|(i, &r)| (r, i.violation()))
            .unzip();
        curves.push((lang.to_string(), s, p));
    }
    let palette = [
        RGBColor(0, 0, 0),
        RGBColor(30, 90, 200),
        RGBColor(200, 30, 30),
        RGBColor(30, 150, 60),
        RGBColor(150, 60, 170),
    ];
    for (n, (name, s, p)) in curves.into_iter().enumerate() {
        let Some(auc) = roc_auc(&s, &p) else { continue };
        let color = palette[n % palette.len()];
        // The operating point: the thresholds in force.
        let c = crate::evaluate::metrics::Confusion::at(&s, &p, 0.0);
        chart
            .draw_series(LineSeries::new(roc_curve(&s, &p), color.stroke_width(2)))?
            .label(format!("{name}: AUC {auc:.3} ({} items)", s.len()))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(std::iter::once(Circle::new(
            (c.false_positive_rate(), c.recall()),
            5,
            color.filled(),
        )))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 13))
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_shares_sum_to_one() {
        let h = histogram(&[-1.0, 0.0, 0.5, 9.0], -1.0, 1.0, 4);
        let total: f32 = h.iter().skip(1).step_by(2).map(|p| p.1).sum();
        assert!((total - 1.0).abs() < 1e-6, "{h:?}");
    }
}
