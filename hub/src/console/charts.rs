//! A spoke's metrics as time-series charts, drawn on the server as SVG:
//! one chart per domain and name, one series per label set, a time axis
//! over the chosen range and a value axis in the points' unit. Every point
//! carries its value in a `<title>` (the browser's tooltip); a legend names
//! each series in text as well as colour, and series differ in dash
//! pattern too.

use std::collections::BTreeMap;
use std::fmt::Write;

use hub_proto::v1 as proto;

use super::layout::{escape, ms};

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 220.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 24.0;
const BOTTOM: f64 = 30.0;
/// Points drawn per series at most (the newest).
const MAX_SERIES_POINTS: usize = 500;
/// Series per chart at most.
const MAX_SERIES: usize = 12;
/// Colours (each at least 4.5:1 on white) and dash patterns of the series.
const COLOURS: [&str; 6] = [
    "#1d4ed8", "#b91c1c", "#047857", "#7c3aed", "#b45309", "#0f766e",
];
const DASHES: [&str; 2] = ["", "6 3"];

/// One series: its points (time ms, value), oldest first.
type Series = Vec<(i64, f64)>;

/// The charts of `points` (any order) between `from` and `to` (Unix ms);
/// a note when there are none.
pub fn render(points: &[proto::StoredMetricPoint], from: i64, to: i64) -> String {
    // domain/name → (unit, labels → series)
    let mut charts: BTreeMap<(String, String), (String, BTreeMap<String, Series>)> =
        BTreeMap::new();
    for stored in points {
        let Some(p) = &stored.point else { continue };
        let Some(at) = ms(p.time.as_ref()) else {
            continue;
        };
        if !p.value.is_finite() {
            continue;
        }
        let labels: Vec<String> = {
            let sorted: BTreeMap<_, _> = p.labels.iter().collect();
            sorted.iter().map(|(k, v)| format!("{k}={v}")).collect()
        };
        let chart = charts
            .entry((p.domain.clone(), p.name.clone()))
            .or_insert_with(|| (p.unit.clone(), BTreeMap::new()));
        if chart.0.is_empty() {
            chart.0.clone_from(&p.unit);
        }
        chart
            .1
            .entry(labels.join(", "))
            .or_default()
            .push((at, p.value));
    }
    if charts.is_empty() {
        return "<p class=\"muted\" id=\"no-metrics\">No metric points in this range.</p>"
            .to_owned();
    }
    let mut html = String::new();
    for ((domain, name), (unit, mut series)) in charts {
        for points in series.values_mut() {
            points.sort_by_key(|(at, _)| *at);
            if points.len() > MAX_SERIES_POINTS {
                points.drain(..points.len() - MAX_SERIES_POINTS);
            }
        }
        chart(&mut html, &domain, &name, &unit, &series, from, to);
    }
    html
}

fn chart(
    html: &mut String,
    domain: &str,
    name: &str,
    unit: &str,
    series: &BTreeMap<String, Series>,
    from: i64,
    to: i64,
) {
    let values = series.values().flatten().map(|(_, v)| *v);
    let (mut lo, mut hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    // From zero when all values are on one side of it; some room when flat.
    if lo > 0.0 {
        lo = 0.0;
    }
    if hi < 0.0 {
        hi = 0.0;
    }
    if (hi - lo).abs() < f64::EPSILON {
        hi = lo + 1.0;
    }
    // Round steps (1, 2 or 5 times a power of ten), the axis on them.
    let step = nice_step((hi - lo) / 4.0);
    lo = (lo / step).floor() * step;
    hi = (hi / step).ceil() * step;
    let ticks = ((hi - lo) / step).round() as i32;
    let span = (to - from).max(1) as f64;
    let x = |at: i64| LEFT + (at - from) as f64 / span * (WIDTH - LEFT - RIGHT);
    let y = |v: f64| TOP + (hi - v) / (hi - lo) * (HEIGHT - TOP - BOTTOM);
    let title = format!("{domain}/{name}");
    let unit_text = if unit.is_empty() {
        String::new()
    } else {
        format!(" ({unit})")
    };
    let _ = write!(
        html,
        "<figure class=\"chart\" data-metric=\"{}\"><figcaption>{}{}</figcaption>\
         <svg viewBox=\"0 0 {WIDTH} {HEIGHT}\" width=\"100%\" role=\"img\" \
         aria-label=\"{} over time, {} series\" xmlns=\"http://www.w3.org/2000/svg\">",
        escape(&title),
        escape(&title),
        escape(&unit_text),
        escape(&title),
        series.len().min(MAX_SERIES)
    );
    // Axes, ticks and grid.
    let _ = write!(
        html,
        "<g class=\"axes\" stroke=\"#5b6170\" stroke-width=\"1\">\
         <line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{b}\"/>\
         <line x1=\"{LEFT}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\"/></g>",
        b = HEIGHT - BOTTOM,
        r = WIDTH - RIGHT
    );
    // The value axis's unit above it; the time axis's zone at its end.
    let _ = write!(
        html,
        "<text class=\"unit\" x=\"4\" y=\"14\" font-size=\"11\" fill=\"#1d2330\">{}</text>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"end\" font-size=\"11\" fill=\"#5b6170\">UTC</text>",
        escape(&super::layout::truncate(
            if unit.is_empty() { "value" } else { unit },
            40
        )),
        WIDTH - RIGHT,
        HEIGHT - 2.0,
    );
    for i in 0..=ticks {
        let v = lo + step * f64::from(i);
        let yy = y(v);
        let _ = write!(
            html,
            "<line x1=\"{LEFT}\" y1=\"{yy:.1}\" x2=\"{r}\" y2=\"{yy:.1}\" stroke=\"#e3e6ea\"/>\
             <text x=\"{tx}\" y=\"{ty:.1}\" text-anchor=\"end\" font-size=\"11\" fill=\"#1d2330\">{}</text>",
            number(v),
            r = WIDTH - RIGHT,
            tx = LEFT - 6.0,
            ty = yy + 4.0,
        );
    }
    for i in 0..=4 {
        let at = from + (to - from) * i / 4;
        let xx = x(at);
        let label = chrono::DateTime::from_timestamp_millis(at)
            .map(|t| {
                if to - from > 2 * 86_400_000 {
                    t.format("%m-%d %H:%M").to_string()
                } else {
                    t.format("%H:%M").to_string()
                }
            })
            .unwrap_or_default();
        let _ = write!(
            html,
            "<text x=\"{xx:.1}\" y=\"{ty}\" text-anchor=\"middle\" font-size=\"11\" fill=\"#1d2330\">{label}</text>",
            ty = HEIGHT - BOTTOM + 16.0
        );
    }
    let mut legend = String::new();
    for (i, (labels, points)) in series.iter().take(MAX_SERIES).enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let dash = DASHES[(i / COLOURS.len()) % DASHES.len()];
        let shown = if labels.is_empty() {
            "(no labels)"
        } else {
            labels
        };
        let coords: Vec<String> = points
            .iter()
            .map(|(at, v)| format!("{:.1},{:.1}", x(*at), y(*v)))
            .collect();
        let _ = write!(
            html,
            "<g class=\"series\" data-series=\"{}\"><polyline fill=\"none\" stroke=\"{colour}\" \
             stroke-width=\"2\" stroke-dasharray=\"{dash}\" points=\"{}\"/>",
            escape(shown),
            coords.join(" ")
        );
        for (at, v) in points {
            let time = chrono::DateTime::from_timestamp_millis(*at)
                .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                .unwrap_or_default();
            let _ = write!(
                html,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"><title>{}</title></circle>",
                x(*at),
                y(*v),
                escape(&format!(
                    "{shown}: {}{}{unit} at {time}",
                    number(*v),
                    if unit.is_empty() { "" } else { " " }
                ))
            );
        }
        html.push_str("</g>");
        let _ = write!(
            legend,
            "<span><svg width=\"18\" height=\"8\" aria-hidden=\"true\"><line x1=\"0\" y1=\"4\" x2=\"18\" \
             y2=\"4\" stroke=\"{colour}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\"/></svg> {}</span>",
            escape(shown)
        );
    }
    let more = series.len().saturating_sub(MAX_SERIES);
    if more > 0 {
        let _ = write!(
            legend,
            "<span class=\"muted\">and {more} more series not drawn</span>"
        );
    }
    let _ = write!(html, "</svg><div class=\"legend\">{legend}</div></figure>");
}

/// The smallest of 1, 2 or 5 times a power of ten that is at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let power = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|s| *s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * power)
}

/// A value as axis and tooltip text: whole numbers without a fraction,
/// others with up to 3 significant decimals.
fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        let text = format!("{v:.3}");
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(
        name: &str,
        labels: &[(&str, &str)],
        at_ms: i64,
        value: f64,
    ) -> proto::StoredMetricPoint {
        proto::StoredMetricPoint {
            point: Some(proto::MetricPoint {
                domain: "statistics".into(),
                name: name.into(),
                value,
                unit: "ms".into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
                time: Some(crate::wire::timestamp_ms(at_ms)),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn one_chart_per_metric_one_series_per_label_set_values_in_titles() {
        let points = vec![
            point("latency", &[("route", "a")], 1_000, 12.0),
            point("latency", &[("route", "a")], 2_000, 14.5),
            point("latency", &[("route", "<b>")], 1_500, 3.0),
            point("orders", &[], 1_200, 7.0),
        ];
        let svg = render(&points, 0, 3_000);
        assert_eq!(svg.matches("<figure class=\"chart\"").count(), 2);
        assert_eq!(svg.matches("<g class=\"series\"").count(), 3);
        assert!(
            svg.contains("route=a: 14.5 ms at 1970-01-01 00:00:02 UTC"),
            "{svg}"
        );
        assert!(svg.contains("statistics/latency"));
        // Label text is escaped wherever it appears.
        assert!(!svg.contains("<b>"));
        assert!(svg.contains("route=&lt;b&gt;"));
    }

    #[test]
    fn no_points_say_so() {
        assert!(render(&[], 0, 1).contains("No metric points"));
    }

    #[test]
    fn axis_steps_are_round() {
        assert_eq!(nice_step(13.975), 20.0);
        assert_eq!(nice_step(0.3), 0.5);
        assert_eq!(nice_step(250.0), 500.0);
        assert_eq!(nice_step(1.0), 1.0);
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(number(3.0), "3");
        assert_eq!(number(2.5), "2.5");
        assert_eq!(number(0.1234), "0.123");
    }
}
