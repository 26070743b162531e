//! `datasets`: what the prepared data sets hold — per-class counts, pixel statistics, samples.

use anyhow::Result;
use indicatif::ProgressBar;
use plotters::style::RGBColor;
use qcl_data::{KnownDataset, SplitDataset};
use serde_json::json;

use crate::data::{dataset_path, Manifest};
use crate::plot;
use crate::reproduce::{Context, Experiment, Outcome};

/// The registry entry.
pub const EXPERIMENT: Experiment = Experiment {
    name: "datasets",
    description: "Fashion-MNIST and MNIST as prepared by `cargo xtask data`: split sizes, \
                  per-class counts, pixel statistics and sample images.",
    needs_data: true,
    takes_seeds: false,
    run,
};

fn run(ctx: &Context, bar: &ProgressBar) -> Result<Outcome> {
    let manifest = Manifest::load_or_default(&ctx.data_dir);
    let mut figures = serde_json::Map::new();
    let mut summary_rows = String::new();
    let mut class_tables = String::new();
    let mut plots = Vec::new();
    let mut summary = Vec::new();
    for dataset in KnownDataset::ALL {
        bar.set_message(format!("datasets: {dataset}"));
        let split = SplitDataset::load(dataset_path(&ctx.data_dir, dataset))?;
        let train_stats = split.train.pixel_stats()?;
        let test_stats = split.test.pixel_stats()?;
        let train_counts = split.train.class_counts();
        let test_counts = split.test.class_counts();
        let skipped = manifest
            .datasets
            .get(dataset.name())
            .map(|e| e.records_read - e.records_kept);
        let source = manifest
            .datasets
            .get(dataset.name())
            .map(|e| e.source.clone());
        figures.insert(
            dataset.name().into(),
            json!({
                "train": split.train.len(),
                "test": split.test.len(),
                "classes": split.train.num_classes(),
                "image_shape": [split.train.shape().channels, split.train.shape().height, split.train.shape().width],
                "train_per_class": train_counts,
                "test_per_class": test_counts,
                "train_pixel_mean": train_stats.mean,
                "train_pixel_std": train_stats.std,
                "test_pixel_mean": test_stats.mean,
                "test_pixel_std": test_stats.std,
                "skipped_at_import": skipped,
                "source": source,
            }),
        );
        summary_rows.push_str(&format!(
            "| {dataset} | {} | {} | {} | {:.4} | {:.4} | {:.4} | {:.4} | {} |\n",
            split.train.len(),
            split.test.len(),
            split.train.num_classes(),
            train_stats.mean,
            train_stats.std,
            test_stats.mean,
            test_stats.std,
            skipped.map_or("?".to_string(), |s| s.to_string()),
        ));
        class_tables.push_str(&format!(
            "\n## {dataset}\n\n| label | class | train | test |\n|---|---|---|---|\n"
        ));
        for (label, name) in split.train.class_names().iter().enumerate() {
            class_tables.push_str(&format!(
                "| {label} | {name} | {} | {} |\n",
                train_counts[label], test_counts[label]
            ));
        }
        let grid = format!("datasets-{dataset}.png");
        plot::image_grid(
            &ctx.out_dir.join(&grid),
            &format!("{dataset}: first training images of each class"),
            &split.train,
            12,
            2,
        )?;
        plots.push((
            grid,
            format!("{dataset}: the first 12 training images of each class"),
        ));
        let bars = format!("datasets-{dataset}-counts.png");
        plot::class_bars(
            &ctx.out_dir.join(&bars),
            &format!("{dataset}: images per class"),
            split.train.class_names(),
            &[
                ("train", train_counts, RGBColor(31, 119, 180)),
                ("test", test_counts, RGBColor(255, 127, 14)),
            ],
        )?;
        plots.push((bars, format!("{dataset}: train and test images per class")));
        summary.push(format!(
            "{dataset} {}+{}",
            split.train.len(),
            split.test.len()
        ));
    }
    let markdown = format!(
        "| data set | train | test | classes | train pixel mean | train pixel std | test pixel mean | test pixel std | records skipped at import |\n\
         |---|---|---|---|---|---|---|---|---|\n{summary_rows}\n\
         Pixel statistics are in [0, 1] units (x / 255).\n{class_tables}"
    );
    Ok(Outcome {
        summary: format!("{} images (train+test)", summary.join(", ")),
        figures: serde_json::Value::Object(figures),
        markdown,
        plots,
    })
}
