//! `chart`: `fanout` at 1k to 20k streams, as a table and an SVG line chart (plotters).

use std::path::Path;

use anyhow::Result;

use crate::Sizes;
use crate::report::Csv;

/// Fan-out latency against the number of streams (1k to 20k, 100 streams per connection), as a table and an
/// SVG line chart.
pub async fn run(a: &Sizes, csv: &mut Csv, svg: &Path) -> Result<()> {
    use plotters::prelude::*;
    let sizes: &[usize] = if a.quick {
        &[50, 100, 200]
    } else {
        &[1000, 2000, 5000, 10000, 15000, 20000]
    };
    let mut points = Vec::new();
    for &n in sizes {
        let run = Sizes {
            streams: n,
            connections: (n / 100).max(1),
            rotations: if a.quick { 2 } else { 8 },
            secrets: 1,
            ..a.clone()
        };
        let mut local = Csv(Vec::new());
        crate::fanout::run(&run, &mut local).await?;
        let get = |metric: &str| -> f64 {
            local
                .0
                .iter()
                .find(|l| l.split(',').nth(2) == Some(metric))
                .and_then(|l| l.split(',').nth(3)?.parse().ok())
                .unwrap_or(f64::NAN)
        };
        points.push((n as f64, get("last_stream_median"), get("last_stream_p99")));
        csv.0.extend(local.0);
    }
    let max_x = points.last().map(|p| p.0).unwrap_or(1.0);
    let max_y = points.iter().map(|p| p.2).fold(0.0, f64::max) * 1.15;
    let root = SVGBackend::new(svg, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut c = ChartBuilder::on(&root)
        .caption(
            "acme-sds: rotation to every stream (2 cores, client included)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_x * 1.05, 0.0..max_y.max(1.0))?;
    c.configure_mesh()
        .x_desc("SDS streams")
        .y_desc("ms until the last stream has the new version")
        .draw()?;
    c.draw_series(LineSeries::new(points.iter().map(|p| (p.0, p.1)), &BLUE))?
        .label("median")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    c.draw_series(LineSeries::new(points.iter().map(|p| (p.0, p.2)), &RED))?
        .label("p99")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    c.draw_series(
        points
            .iter()
            .map(|p| Circle::new((p.0, p.2), 3, RED.filled())),
    )?;
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    println!("chart written to {}", svg.display());
    Ok(())
}
