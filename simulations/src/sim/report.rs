//! What a run leaves behind: `metrics.jsonl` (one line per round), `metrics.csv`, `summary.json`, and plots
//! as SVG and PNG (accuracy and loss against round with the baselines as lines, ε against round, bytes
//! against round); and the short table printed at the end.
//!
//! What must never live here: anything that changes a figure (this module only formats them).

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{Outcome, RoundMetrics, SimError};

/// The font plots are lettered with (DejaVu Sans, shipped in assets/fonts: no system fonts needed).
const FONT: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");

/// The error of writing `path`.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SimError + '_ {
    move |source| SimError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes every file of the run into `dir` (created if needed); returns the files written.
pub fn write(dir: &Path, outcome: &Outcome) -> Result<Vec<String>, SimError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut written = Vec::new();
    let mut put = |name: &str, bytes: &[u8]| -> Result<(), SimError> {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(io(&p))?;
        written.push(name.to_string());
        Ok(())
    };
    let mut jsonl = String::new();
    for r in &outcome.rounds {
        jsonl.push_str(&serde_json::to_string(r)?);
        jsonl.push('\n');
    }
    put("metrics.jsonl", jsonl.as_bytes())?;
    put("metrics.csv", csv(&outcome.rounds).as_bytes())?;
    put(
        "summary.json",
        serde_json::to_string_pretty(&outcome.summary)?.as_bytes(),
    )?;
    for name in plots(dir, outcome)? {
        written.push(name);
    }
    Ok(written)
}

/// The rounds as CSV (a header, then one row per round; empty cells where a round was not evaluated).
pub fn csv(rounds: &[RoundMetrics]) -> String {
    let mut out = String::from(
        "round,version,test_loss,perplexity,accuracy,epsilon_user,epsilon_device_max,epsilon_device_mean,\
         selected,participants,dropouts,declined,refused,train_loss,bytes_up,bytes_down,base_bytes_down,\
         abandoned_before,sim_time_s,wall_s\n",
    );
    let opt = |x: Option<f64>| x.map_or(String::new(), |v| format!("{v}"));
    for r in rounds {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            r.round,
            r.version,
            opt(r.test_loss),
            opt(r.perplexity),
            opt(r.accuracy),
            r.epsilon_user,
            r.epsilon_device_max,
            r.epsilon_device_mean,
            r.selected,
            r.participants,
            r.dropouts,
            r.declined,
            r.refused,
            r.train_loss,
            r.bytes_up,
            r.bytes_down,
            r.base_bytes_down,
            r.abandoned_before,
            r.sim_time_s,
            r.wall_s
        ));
    }
    out
}

/// One line of a plot.
struct Series {
    label: String,
    points: Vec<(f64, f64)>,
    color: RGBColor,
    dashed: bool,
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // A failure leaves plots without text rather than failing the run (reported when drawing).
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn plots(dir: &Path, o: &Outcome) -> Result<Vec<String>, SimError> {
    register_font();
    let x = |r: &RoundMetrics| r.round as f64;
    let line = |label: &str, f: &dyn Fn(&RoundMetrics) -> Option<f64>, color: RGBColor| Series {
        label: label.into(),
        points: o
            .rounds
            .iter()
            .filter_map(|r| f(r).map(|y| (x(r), y)))
            .collect(),
        color,
        dashed: false,
    };
    let last = o.rounds.last().map_or(1.0, |r| r.round.max(1) as f64);
    let hline = |label: String, y: f64, color: RGBColor| Series {
        label,
        points: vec![(0.0, y), (last, y)],
        color,
        dashed: true,
    };
    let b = &o.summary;
    let mut acc = vec![line("federated", &|r| r.accuracy, BLUE)];
    let mut loss = vec![line("federated", &|r| r.test_loss, BLUE)];
    // Baselines are horizontal lines on both the accuracy and the loss plot.
    let mut baselines = vec![("base model".to_string(), b.base, BLACK)];
    if let Some(bl) = &b.baselines {
        baselines.push((centralized_label(bl), bl.centralized, RGBColor(0, 150, 60)));
        if bl.local_only_clients > 0 {
            baselines.push((
                format!("local only ({} clients)", bl.local_only_clients),
                bl.local_only,
                RGBColor(230, 120, 0),
            ));
        }
    }
    for (label, scores, color) in baselines {
        acc.push(hline(label.clone(), scores.accuracy, color));
        loss.push(hline(label, scores.loss, color));
    }
    let eps = vec![
        line(
            "user-level ε (coordinator)",
            &|r| Some(r.epsilon_user),
            BLUE,
        ),
        line("device-level ε, max", &|r| Some(r.epsilon_device_max), RED),
    ];
    let mib = |v: u64| v as f64 / (1024.0 * 1024.0);
    let bytes = vec![
        line("up (MiB)", &|r| Some(mib(r.bytes_up)), BLUE),
        line("down (MiB)", &|r| Some(mib(r.bytes_down)), RED),
    ];
    let title = &b.scenario;
    let charts: [(&str, String, &str, Vec<Series>); 4] = [
        (
            "accuracy",
            format!("{title}: next-token accuracy"),
            "accuracy",
            acc,
        ),
        (
            "loss",
            format!("{title}: test loss"),
            "loss (nats/token)",
            loss,
        ),
        ("epsilon", format!("{title}: privacy spent"), "ε", eps),
        ("bytes", format!("{title}: traffic per round"), "MiB", bytes),
    ];
    let mut out = Vec::new();
    for (name, caption, y, series) in charts {
        let svg = dir.join(format!("{name}.svg"));
        draw(
            SVGBackend::new(&svg, (900, 540)).into_drawing_area(),
            &caption,
            y,
            &series,
        )?;
        let png = dir.join(format!("{name}.png"));
        draw(
            BitMapBackend::new(&png, (900, 540)).into_drawing_area(),
            &caption,
            y,
            &series,
        )?;
        out.push(format!("{name}.svg"));
        out.push(format!("{name}.png"));
    }
    Ok(out)
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    caption: &str,
    y_desc: &str,
    series: &[Series],
) -> Result<(), SimError> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| SimError::Plot {
        caption: caption.to_string(),
        detail: format!("{e:?}"),
    };
    root.fill(&WHITE).map_err(err)?;
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (0f64, 1f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        if y.is_finite() {
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if !y0.is_finite() {
        (y0, y1) = (0.0, 1.0);
    }
    let pad = ((y1 - y0) * 0.08).max(1e-6);
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(42)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))
        .map_err(err)?;
    // Rounds are whole numbers: at most one tick per round, labelled without decimals.
    let rounds = (x1.max(x0 + 1.0) - x0).round() as usize;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc(y_desc)
        .x_labels((rounds + 1).min(11))
        .x_label_formatter(&round_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    for s in series {
        let color = s.color;
        let style = ShapeStyle::from(&color).stroke_width(2);
        let drawn = if s.dashed {
            chart
                .draw_series(DashedLineSeries::new(s.points.clone(), 8, 5, style))
                .map_err(err)?
        } else {
            chart
                .draw_series(LineSeries::new(s.points.clone(), style))
                .map_err(err)?
        };
        drawn.label(s.label.clone()).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
        });
        if !s.dashed && s.points.len() <= 60 {
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(err)?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// A tick label on the round axis: the round number, or nothing between rounds.
fn round_label(x: &f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{}", x.round() as i64)
    } else {
        String::new()
    }
}

/// The short table printed at the end of a run.
pub fn table(o: &Outcome) -> String {
    let s = &o.summary;
    let mut t = String::new();
    t.push_str(&format!(
        "scenario {} (seed {}, {:?}): {} clients, {} per round, {} rounds published ({} abandoned), strategy {}\n",
        s.scenario,
        s.seed,
        s.transport,
        s.clients,
        s.clients_per_round,
        s.rounds,
        s.rounds_abandoned,
        s.strategy
    ));
    t.push_str(&format!(
        "{:<40} {:>10} {:>11} {:>10}\n",
        "model", "test loss", "perplexity", "accuracy"
    ));
    let row = |name: &str, sc: &super::Scores| {
        format!(
            "{:<40} {:>10.4} {:>11.3} {:>9.2}%\n",
            name,
            sc.loss,
            sc.perplexity,
            sc.accuracy * 100.0
        )
    };
    t.push_str(&row("base model", &s.base));
    t.push_str(&row("federated (final)", &s.final_scores));
    if let Some(b) = &s.baselines {
        t.push_str(&row(&centralized_label(b), &b.centralized));
        if b.centralized_tries.len() > 1 {
            for c in &b.centralized_tries {
                t.push_str(&row(&format!("  tried lr {}", c.learning_rate), &c.scores));
            }
        }
        if b.local_only_clients > 0 {
            t.push_str(&row(
                &format!("local only ({} clients)", b.local_only_clients),
                &b.local_only,
            ));
            t.push_str(&row(
                "  federated, same clients",
                &b.federated_on_local_clients,
            ));
            t.push_str(&row("  base, same clients", &b.base_on_local_clients));
        }
    }
    if let Some(g) = s.gap_closed {
        t.push_str(&format!(
            "gap closed: {:.0}% of the base → centralized accuracy gap\n",
            g * 100.0
        ));
    } else if s.baselines.is_some() {
        t.push_str("gap closed (accuracy): undefined — centralized is not more accurate than the base model\n");
    }
    if let Some(g) = s.gap_closed_loss {
        t.push_str(&format!(
            "gap closed: {:.0}% of the base → centralized test-loss gap\n",
            g * 100.0
        ));
    }
    if s.epsilon_user > 0.0 || s.noise_multiplier > 0.0 {
        t.push_str(&format!(
            "user-level ε = {:.3} at δ = {:e} (noise multiplier {:.4})\n",
            s.epsilon_user, s.delta_user, s.noise_multiplier
        ));
    }
    if s.epsilon_device_max > 0.0 {
        t.push_str(&format!(
            "device-level ε (DP-SGD), largest: {:.3}\n",
            s.epsilon_device_max
        ));
    }
    t.push_str(&format!(
        "traffic: {:.2} MiB up, {:.2} MiB down (+ {:.2} MiB of base model bundles); simulated {:.0} s in {:.1} s\n",
        s.bytes_up as f64 / 1048576.0,
        s.bytes_down as f64 / 1048576.0,
        s.base_bytes_down as f64 / 1048576.0,
        s.sim_time_s,
        s.wall_s
    ));
    t
}

/// How the centralized baseline is named in the table and the plots: its schedule.
fn centralized_label(b: &super::Baselines) -> String {
    format!(
        "centralized ({} {} steps × {}, lr {})",
        b.centralized_optimizer.name(),
        b.centralized_steps,
        b.centralized_batch_size,
        b.centralized_learning_rate
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_round_axis_is_labelled_in_whole_rounds() {
        assert_eq!(round_label(&2.0), "2");
        assert_eq!(round_label(&2.5), "");
        register_font();
        for rounds in [3usize, 12, 40] {
            let mut svg = String::new();
            let series = [Series {
                label: "federated".into(),
                color: BLUE,
                dashed: false,
                // Tiny values, so no y label can look like a round.
                points: (0..=rounds).map(|r| (r as f64, 1e-3 * r as f64)).collect(),
            }];
            draw(
                SVGBackend::with_string(&mut svg, (640, 400)).into_drawing_area(),
                "test",
                "loss",
                &series,
            )
            .unwrap();
            // Every text element's content.
            let texts: Vec<&str> = svg
                .split("<text")
                .skip(1)
                .filter_map(|t| {
                    t.split_once('>')
                        .and_then(|(_, rest)| rest.split_once("</text>"))
                })
                .map(|(content, _)| content.trim())
                .collect();
            assert!(
                !texts.iter().any(|t| ["0.5", "1.5", "2.0"].contains(t)),
                "{rounds}: decimal round labels in {texts:?}"
            );
            assert!(
                texts.contains(&"0") && texts.contains(&"round"),
                "{texts:?}"
            );
        }
    }
}
