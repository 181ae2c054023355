//! The plots next to the summary (`target/bench/*.png`), drawn with plotters. Text
//! needs a TrueType font: the first found of a few usual system paths (or
//! `ORDERLINE_BENCH_FONT`); without one the plot is skipped, with a line saying so.

use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::PathBuf;
use std::sync::OnceLock;

/// One line of a plot: its label and its (x, y) points.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

/// Register a font for plotters once; false when none was found.
fn font() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        let candidates = std::env::var("ORDERLINE_BENCH_FONT")
            .into_iter()
            .chain(FONTS.iter().map(|f| (*f).to_owned()));
        for path in candidates {
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            // plotters keeps the font for the whole process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
        false
    })
}

fn path(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/bench")
        .join(file)
}

/// Draw `series` as lines into `target/bench/<file>`; says where, or why not.
pub fn lines(file: &str, title: &str, x: &str, y: &str, series: &[Series]) {
    draw(file, title, x, y, series, false);
}

/// The same with a logarithmic x axis (e.g. concurrency 1, 16, 256).
pub fn lines_log_x(file: &str, title: &str, x: &str, y: &str, series: &[Series]) {
    draw(file, title, x, y, series, true);
}

fn draw(file: &str, title: &str, x: &str, y: &str, series: &[Series], log_x: bool) {
    if !super::filters().is_empty() {
        eprintln!("{file}: only some variants ran; plot left as it was");
        return;
    }
    if !font() {
        eprintln!("{file}: no TrueType font found (set ORDERLINE_BENCH_FONT); plot skipped");
        return;
    }
    let target = path(file);
    if let Some(dir) = target.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match render(&target, title, x, y, series, log_x) {
        Ok(()) => eprintln!("plot: {}", target.display()),
        Err(error) => eprintln!("{file}: not drawn: {error}"),
    }
}

fn render(
    target: &std::path::Path,
    title: &str,
    x: &str,
    y: &str,
    series: &[Series],
    log_x: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let points = series.iter().flat_map(|s| s.points.iter());
    let (mut x_max, mut y_max, mut x_min) = (0f64, 0f64, f64::MAX);
    for (px, py) in points {
        x_max = x_max.max(*px);
        x_min = x_min.min(*px);
        y_max = y_max.max(*py);
    }
    let y_range = 0.0..(y_max * 1.1).max(1.0);
    let root = BitMapBackend::new(target, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(80);
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    macro_rules! plot {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x)
                .y_desc(y)
                .label_style(("sans-serif", 14))
                .draw()?;
            for (i, s) in series.iter().enumerate() {
                let color = colors[i % colors.len()];
                chart
                    .draw_series(LineSeries::new(
                        s.points.iter().copied(),
                        color.stroke_width(2),
                    ))?
                    .label(s.label.as_str())
                    .legend(move |(lx, ly)| {
                        PathElement::new(vec![(lx, ly), (lx + 20, ly)], color.stroke_width(2))
                    });
                chart.draw_series(s.points.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .draw()?;
        }};
    }
    if log_x {
        let x_range = (x_min.max(1.0) / 1.5..x_max.max(1.0) * 1.5).log_scale();
        plot!(builder.build_cartesian_2d(x_range, y_range)?);
    } else {
        let x_min = if x_min.is_finite() { x_min } else { 0.0 };
        let span = (x_max - x_min).max(1.0);
        plot!(builder.build_cartesian_2d(x_min..x_max + span * 0.02, y_range)?);
    }
    root.present()?;
    Ok(())
}
