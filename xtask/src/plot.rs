//! PNG plots, written atomically (drawn to a temporary file, then renamed).

use std::path::Path;

use anyhow::{Context as _, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use qcl_data::Dataset;

/// Draws into a `width × height` PNG at `path` through `draw`, then renames it into place.
pub fn png(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<()>,
) -> Result<()> {
    let file_name = path
        .file_name()
        .context("plot path names no file")?
        .to_string_lossy();
    // The extension must stay `.png`: plotters picks the encoder from it.
    let temp = path.with_file_name(format!(".{file_name}.tmp.png"));
    {
        let root = BitMapBackend::new(&temp, size).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
    }
    std::fs::rename(&temp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// A grid of sample images: one row per class (its name on the left), the first `per_row`
/// images of that class, each pixel drawn as a `scale × scale` square in grey levels.
pub fn image_grid(
    path: &Path,
    title: &str,
    dataset: &Dataset,
    per_row: usize,
    scale: u32,
) -> Result<()> {
    let shape = dataset.shape();
    let (w, h) = (shape.width as u32 * scale, shape.height as u32 * scale);
    let gap = 4;
    let label_width = 110;
    let title_height = 34;
    let classes = dataset.num_classes() as u32;
    let size = (
        label_width + per_row as u32 * (w + gap) + gap,
        title_height + classes * (h + gap) + gap,
    );
    png(path, size, |root| {
        root.draw(&Text::new(title, (8, 8), ("sans-serif", 20).into_font()))?;
        let mut shown = vec![0usize; dataset.num_classes()];
        for i in 0..dataset.len() {
            let class = dataset.labels()[i] as usize;
            if shown[class] >= per_row {
                continue;
            }
            let x0 = label_width + gap + shown[class] as u32 * (w + gap);
            let y0 = title_height + class as u32 * (h + gap);
            let image = dataset.image(i);
            for y in 0..shape.height {
                for x in 0..shape.width {
                    // Channel mean as grey level (all our data sets have one channel).
                    let v = (0..shape.channels)
                        .map(|c| u32::from(image[(c * shape.height + y) * shape.width + x]))
                        .sum::<u32>()
                        / shape.channels as u32;
                    let colour = RGBColor(v as u8, v as u8, v as u8);
                    let (px, py) = (x0 + x as u32 * scale, y0 + y as u32 * scale);
                    root.draw(&Rectangle::new(
                        [
                            (px as i32, py as i32),
                            ((px + scale) as i32, (py + scale) as i32),
                        ],
                        colour.filled(),
                    ))?;
                }
            }
            shown[class] += 1;
        }
        for (class, name) in dataset.class_names().iter().enumerate() {
            let y = title_height + class as u32 * (h + gap) + h / 2 - 7;
            root.draw(&Text::new(
                name.as_str(),
                (6, y as i32),
                ("sans-serif", 15).into_font(),
            ))?;
        }
        Ok(())
    })
}

/// The name of category `i` for a tick at x = i on a categorical axis (empty between them).
pub fn category_label(names: &[String], x: f64) -> String {
    let i = x.round();
    if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
        names[i as usize].clone()
    } else {
        String::new()
    }
}

/// Grouped bars: for each class, one bar per series (e.g. train and test counts).
pub fn class_bars(
    path: &Path,
    title: &str,
    class_names: &[String],
    series: &[(&str, Vec<usize>, RGBColor)],
) -> Result<()> {
    let max = series
        .iter()
        .flat_map(|(_, v, _)| v.iter().copied())
        .max()
        .unwrap_or(1) as f64;
    png(path, (760, 420), |root| {
        let classes = class_names.len();
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(60)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5..classes as f64 - 0.5, 0.0..max * 1.25)?;
        let names = class_names.to_vec();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(WHITE)
            .x_labels(classes + 1)
            .x_label_formatter(&move |x| category_label(&names, *x))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .y_desc("images")
            .draw()?;
        let width = 0.8 / series.len() as f64;
        for (s, (label, values, colour)) in series.iter().enumerate() {
            let colour = *colour;
            chart
                .draw_series(values.iter().enumerate().map(|(c, &v)| {
                    let x0 = c as f64 - 0.4 + s as f64 * width;
                    Rectangle::new([(x0, 0.0), (x0 + width, v as f64)], colour.filled())
                }))?
                .label(*label)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled())
                });
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        Ok(())
    })
}

/// Draws `chart`'s series legend at `position` in the one style every plot uses: a
/// translucent white box with a black border.
pub fn legend<'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, CT>,
    position: SeriesLabelPosition,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
