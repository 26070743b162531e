//! In-memory labelled image sets and their safetensors file format.
//!
//! (Over 600 lines: the image shape, the pixel normalisation, the `Dataset` with its subsets and
//! tensors, the train/test `SplitDataset` with its file format and the batch iterator all work on
//! one pixel-and-label layout; about 170 lines are doc comments.)

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use qcl_tensor::{write_safetensors, Error, Result, SafetensorsFile, TensorSpec};

/// Value of the `format` metadata key of a qcl data set file.
pub const DATASET_FORMAT: &str = "qcl-dataset/1";

/// Channels, height and width of every image of a data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageShape {
    /// Colour channels (1 for MNIST-like sets).
    pub channels: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

impl ImageShape {
    /// Shape of MNIST and Fashion-MNIST images: 1×28×28.
    pub const MNIST: ImageShape = ImageShape {
        channels: 1,
        height: 28,
        width: 28,
    };

    /// Bytes (= pixels × channels) of one image.
    pub fn len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Whether an image of this shape holds no pixel.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How `u8` pixels become `f32` model inputs.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Normalization {
    /// `x / 255`, in `[0, 1]`.
    #[default]
    UnitInterval,
    /// `(x / 255 − 0.5) · 2`, in `[−1, 1]` (the AQM convention).
    Symmetric,
    /// `(x / 255 − mean) / std`, with a data set's statistics in `[0, 1]` units.
    Standardize {
        /// Mean of the `[0, 1]` pixels.
        mean: f32,
        /// Standard deviation of the `[0, 1]` pixels.
        std: f32,
    },
}

impl Normalization {
    /// The normalised value of one pixel.
    ///
    /// ```
    /// use qcl_data::Normalization;
    /// assert_eq!(Normalization::UnitInterval.apply(255), 1.0);
    /// assert_eq!(Normalization::Symmetric.apply(0), -1.0);
    /// ```
    pub fn apply(self, pixel: u8) -> f32 {
        let x = f32::from(pixel) / 255.0;
        match self {
            Normalization::UnitInterval => x,
            Normalization::Symmetric => (x - 0.5) * 2.0,
            Normalization::Standardize { mean, std } => (x - mean) / std,
        }
    }

    fn validate(self) -> Result<Self> {
        if let Normalization::Standardize { mean, std } = self {
            if !(mean.is_finite() && std.is_finite() && std > 0.0) {
                return Err(Error::invalid_parameter(
                    "normalization",
                    format!("standardisation needs finite mean and std > 0, got {mean}, {std}"),
                ));
            }
        }
        Ok(self)
    }

    /// A 256-entry lookup table, so that batches are built without per-pixel arithmetic.
    fn table(self) -> [f32; 256] {
        let mut table = [0f32; 256];
        for (pixel, value) in table.iter_mut().enumerate() {
            *value = self.apply(pixel as u8);
        }
        table
    }
}

/// Mean and standard deviation of a data set's pixels in `[0, 1]` units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PixelStats {
    /// Mean pixel value.
    pub mean: f64,
    /// Population standard deviation of the pixel values.
    pub std: f64,
}

/// Labelled images held as `u8` in **NCHW** order (`[N, C, H, W]`), the layout candle's
/// convolutions take, with labels `0..num_classes`.
///
/// ```
/// use qcl_data::{Dataset, ImageShape};
/// let shape = ImageShape { channels: 1, height: 2, width: 2 };
/// let ds = Dataset::new("toy", shape, vec![0, 0, 0, 0, 255, 255, 255, 255], vec![0, 1],
///                       vec!["dark".into(), "light".into()])?;
/// assert_eq!(ds.len(), 2);
/// assert_eq!(ds.class_counts(), vec![1, 1]);
/// assert_eq!(ds.select_classes(&[1])?.image(0), &[255, 255, 255, 255]);
/// # Ok::<(), qcl_tensor::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    name: String,
    shape: ImageShape,
    images: Vec<u8>,
    labels: Vec<u32>,
    class_names: Vec<String>,
}

impl Dataset {
    /// A data set from raw parts.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if `images` is not `labels.len()` images of `shape`;
    /// [`Error::InvalidRecord`] for a label outside `0..class_names.len()`;
    /// [`Error::InvalidParameter`] for an empty image shape or no class.
    pub fn new(
        name: impl Into<String>,
        shape: ImageShape,
        images: Vec<u8>,
        labels: Vec<u32>,
        class_names: Vec<String>,
    ) -> Result<Self> {
        let name = name.into();
        if shape.is_empty() {
            return Err(Error::invalid_parameter("shape", "images must have pixels"));
        }
        if class_names.is_empty() {
            return Err(Error::invalid_parameter(
                "class_names",
                "a data set needs classes",
            ));
        }
        if images.len() != labels.len() * shape.len() {
            return Err(Error::ShapeMismatch {
                context: format!("images of {name}"),
                expected: format!(
                    "[{}, {}, {}, {}] ({} bytes)",
                    labels.len(),
                    shape.channels,
                    shape.height,
                    shape.width,
                    labels.len() * shape.len()
                ),
                actual: vec![images.len()],
            });
        }
        if let Some((index, &label)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= class_names.len())
        {
            return Err(Error::InvalidRecord {
                source_name: name,
                index,
                reason: format!(
                    "label {label} is not one of the {} classes",
                    class_names.len()
                ),
            });
        }
        Ok(Dataset {
            name,
            shape,
            images,
            labels,
            class_names,
        })
    }

    /// Name of the data set (e.g. `fashion-mnist`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether it holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Shape of each image.
    pub fn shape(&self) -> ImageShape {
        self.shape
    }

    /// Number of classes (labels are `0..num_classes`).
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// Human-readable class names, indexed by label.
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    /// All labels.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// All pixels, NCHW.
    pub fn pixels(&self) -> &[u8] {
        &self.images
    }

    /// Pixels of image `index` (CHW).
    ///
    /// # Panics
    /// If `index >= len()`, like slice indexing.
    pub fn image(&self, index: usize) -> &[u8] {
        let n = self.shape.len();
        &self.images[index * n..(index + 1) * n]
    }

    /// Number of images of each class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_classes()];
        for &label in &self.labels {
            counts[label as usize] += 1;
        }
        counts
    }

    /// Mean and standard deviation of all pixels in `[0, 1]` units.
    ///
    /// # Errors
    /// [`Error::EmptyInput`] for an empty data set.
    pub fn pixel_stats(&self) -> Result<PixelStats> {
        if self.is_empty() {
            return Err(Error::EmptyInput(format!(
                "pixel statistics of empty {}",
                self.name
            )));
        }
        let mut histogram = [0u64; 256];
        for &p in &self.images {
            histogram[p as usize] += 1;
        }
        let count = self.images.len() as f64;
        let mean = histogram
            .iter()
            .enumerate()
            .map(|(v, &c)| v as f64 / 255.0 * c as f64)
            .sum::<f64>()
            / count;
        let var = histogram
            .iter()
            .enumerate()
            .map(|(v, &c)| (v as f64 / 255.0 - mean).powi(2) * c as f64)
            .sum::<f64>()
            / count;
        Ok(PixelStats {
            mean,
            std: var.sqrt(),
        })
    }

    /// The images at `indices`, in that order (repeats allowed), with their labels.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for an index out of range.
    pub fn subset(&self, indices: &[usize]) -> Result<Dataset> {
        self.check_indices(indices)?;
        let mut images = Vec::with_capacity(indices.len() * self.shape.len());
        for &i in indices {
            images.extend_from_slice(self.image(i));
        }
        Ok(Dataset {
            name: self.name.clone(),
            shape: self.shape,
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            class_names: self.class_names.clone(),
        })
    }

    /// The images whose label is in `classes`, in their original order, labels unchanged.
    ///
    /// This is the building block of continual-learning scenarios (one task = a class set).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a class that does not exist.
    pub fn select_classes(&self, classes: &[u32]) -> Result<Dataset> {
        let mut wanted = vec![false; self.num_classes()];
        for &c in classes {
            let slot = wanted.get_mut(c as usize).ok_or_else(|| {
                Error::invalid_parameter(
                    "classes",
                    format!(
                        "class {c} does not exist in {} ({} classes)",
                        self.name,
                        self.num_classes()
                    ),
                )
            })?;
            *slot = true;
        }
        let indices: Vec<usize> = (0..self.len())
            .filter(|&i| wanted[self.labels[i] as usize])
            .collect();
        self.subset(&indices)
    }

    /// The first `per_class` images of each class (fewer where a class has fewer), in their
    /// original order.
    pub fn take_per_class(&self, per_class: usize) -> Dataset {
        let mut taken = vec![0usize; self.num_classes()];
        let indices: Vec<usize> = (0..self.len())
            .filter(|&i| {
                let slot = &mut taken[self.labels[i] as usize];
                *slot += 1;
                *slot <= per_class
            })
            .collect();
        self.subset(&indices).expect("indices come from 0..len")
    }

    /// `self` followed by the images of `others`, in order (the name is `self`'s). Replay
    /// training uses it to join a task's data with the replay memory.
    ///
    /// ```
    /// use qcl_data::{Dataset, ImageShape};
    /// let shape = ImageShape { channels: 1, height: 1, width: 2 };
    /// let names = vec!["a".to_string(), "b".to_string()];
    /// let first = Dataset::new("x", shape, vec![1, 2], vec![0], names.clone())?;
    /// let second = Dataset::new("y", shape, vec![3, 4, 5, 6], vec![1, 1], names)?;
    /// let joined = first.concat(&[&second])?;
    /// assert_eq!(joined.labels(), &[0, 1, 1]);
    /// assert_eq!(joined.image(2), &[5, 6]);
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for another image shape; [`Error::InvalidParameter`] for other
    /// class names (the labels would not mean the same classes).
    pub fn concat(&self, others: &[&Dataset]) -> Result<Dataset> {
        let mut joined = self.clone();
        for other in others {
            if other.shape != self.shape {
                return Err(Error::ShapeMismatch {
                    context: format!("concatenating {} to {}", other.name, self.name),
                    expected: format!("{:?}", self.shape),
                    actual: vec![other.shape.channels, other.shape.height, other.shape.width],
                });
            }
            if other.class_names != self.class_names {
                return Err(Error::invalid_parameter(
                    "others",
                    format!(
                        "{} and {} name their classes differently",
                        self.name, other.name
                    ),
                ));
            }
            joined.images.extend_from_slice(&other.images);
            joined.labels.extend_from_slice(&other.labels);
        }
        Ok(joined)
    }

    /// Images at `indices` as an `f32` tensor `[n, C, H, W]`, normalised, on `device`, and
    /// their labels as a `u32` tensor `[n]`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for an index out of range or a bad normalisation.
    pub fn tensors_at(
        &self,
        indices: &[usize],
        normalization: Normalization,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        self.check_indices(indices)?;
        let table = normalization.validate()?.table();
        let n = self.shape.len();
        let mut values = Vec::with_capacity(indices.len() * n);
        for &i in indices {
            values.extend(self.image(i).iter().map(|&p| table[p as usize]));
        }
        let ImageShape {
            channels,
            height,
            width,
        } = self.shape;
        let images = Tensor::from_vec(values, (indices.len(), channels, height, width), device)?;
        let labels: Vec<u32> = indices.iter().map(|&i| self.labels[i]).collect();
        let labels = Tensor::from_vec(labels, indices.len(), device)?;
        Ok((images, labels))
    }

    /// The whole set as tensors (see [`tensors_at`](Dataset::tensors_at)).
    ///
    /// # Errors
    /// As [`tensors_at`](Dataset::tensors_at).
    pub fn to_tensors(
        &self,
        normalization: Normalization,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let all: Vec<usize> = (0..self.len()).collect();
        self.tensors_at(&all, normalization, device)
    }

    fn check_indices(&self, indices: &[usize]) -> Result<()> {
        match indices.iter().find(|&&i| i >= self.len()) {
            Some(&bad) => Err(Error::invalid_parameter(
                "indices",
                format!("index {bad} is out of range for {} images", self.len()),
            )),
            None => Ok(()),
        }
    }

    /// Checks that `other` has the same image shape and classes, so the two can be a split.
    fn check_compatible(&self, other: &Dataset) -> Result<()> {
        if self.shape != other.shape || self.class_names != other.class_names {
            return Err(Error::invalid_parameter(
                "split",
                format!(
                    "train and test differ: {:?}/{} classes vs {:?}/{} classes",
                    self.shape,
                    self.num_classes(),
                    other.shape,
                    other.num_classes()
                ),
            ));
        }
        Ok(())
    }
}

/// A data set's fixed train and test parts, as stored in one safetensors file.
///
/// File layout: tensors `train.images`, `test.images` (`u8 [N, C, H, W]`), `train.labels`,
/// `test.labels` (`u8 [N]`, or `u32` for more than 256 classes); metadata `format` =
/// [`DATASET_FORMAT`], `name`, `layout` = `NCHW`, `class_names` (a JSON array), and whatever
/// the writer adds (source, split rule, skipped records).
///
/// ```
/// use std::collections::BTreeMap;
/// use qcl_data::{Dataset, ImageShape, SplitDataset};
/// let shape = ImageShape { channels: 1, height: 1, width: 2 };
/// let part = |px: Vec<u8>, labels| Dataset::new("toy", shape, px, labels, vec!["a".into(), "b".into()]);
/// let split = SplitDataset::new(part(vec![1, 2, 3, 4], vec![0, 1])?, part(vec![5, 6], vec![1])?)?;
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("toy.safetensors");
/// split.save(&path, &BTreeMap::new())?;
/// assert_eq!(SplitDataset::load(&path)?, split);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct SplitDataset {
    /// Training images.
    pub train: Dataset,
    /// Test images.
    pub test: Dataset,
}

impl SplitDataset {
    /// Every image of both parts (train, then test) as one row-major `f32` matrix of raw pixel
    /// values (0–255), with its row length: the points a k-means or an index is fitted on.
    ///
    /// ```
    /// # let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/fashion-mnist.safetensors");
    /// let data = qcl_data::SplitDataset::load(path)?;
    /// let (points, d) = data.all_pixels_f32();
    /// assert_eq!(d, 784);
    /// assert_eq!(points.len(), (data.train.len() + data.test.len()) * d);
    /// assert_eq!(points[..d], data.train.image(0).iter().map(|&p| f32::from(p)).collect::<Vec<_>>()[..]);
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    pub fn all_pixels_f32(&self) -> (Vec<f32>, usize) {
        let pixels = self
            .train
            .pixels()
            .iter()
            .chain(self.test.pixels())
            .map(|&p| f32::from(p))
            .collect();
        (pixels, self.train.shape.len())
    }

    /// Pairs a train and a test part.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if their image shapes or classes differ.
    pub fn new(train: Dataset, test: Dataset) -> Result<Self> {
        train.check_compatible(&test)?;
        Ok(SplitDataset { train, test })
    }

    /// Writes the file atomically; `extra_metadata` is stored beside the required keys.
    ///
    /// # Errors
    /// [`Error::Io`] on write failure.
    pub fn save(
        &self,
        path: impl AsRef<Path>,
        extra_metadata: &BTreeMap<String, String>,
    ) -> Result<()> {
        let mut metadata = extra_metadata.clone();
        metadata.insert("format".into(), DATASET_FORMAT.into());
        metadata.insert("name".into(), self.train.name.clone());
        metadata.insert("layout".into(), "NCHW".into());
        metadata.insert(
            "class_names".into(),
            serde_json::to_string(&self.train.class_names).expect("strings serialise"),
        );
        let cpu = Device::Cpu;
        let mut owned = Vec::new();
        for (part, ds) in [("train", &self.train), ("test", &self.test)] {
            let ImageShape {
                channels,
                height,
                width,
            } = ds.shape;
            let images =
                Tensor::from_vec(ds.images.clone(), (ds.len(), channels, height, width), &cpu)?;
            let labels = Tensor::from_vec(ds.labels.clone(), ds.len(), &cpu)?;
            let labels = if ds.num_classes() <= 256 {
                labels.to_dtype(DType::U8)?
            } else {
                labels
            };
            owned.push((format!("{part}.images"), images));
            owned.push((format!("{part}.labels"), labels));
        }
        let named: Vec<(&str, &Tensor)> = owned.iter().map(|(n, t)| (n.as_str(), t)).collect();
        write_safetensors(path, &named, &metadata)
    }

    /// Reads and validates a file written by [`save`](SplitDataset::save).
    ///
    /// # Errors
    /// [`Error::BadFile`] for a truncated or foreign file or one of another format version,
    /// [`Error::MissingTensor`], [`Error::ShapeMismatch`], [`Error::DTypeMismatch`],
    /// [`Error::InvalidRecord`] for a label out of range.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let file = SafetensorsFile::open(path.as_ref())?;
        Self::from_file(&file)
    }

    /// Validates an already opened file (see [`load`](SplitDataset::load)).
    ///
    /// # Errors
    /// As [`load`](SplitDataset::load).
    pub fn from_file(file: &SafetensorsFile) -> Result<Self> {
        let meta = file.metadata();
        file.require_format(
            DATASET_FORMAT,
            "a qcl data set (write one with `cargo xtask data`)",
        )?;
        let name = meta.get("name").cloned().unwrap_or_default();
        let class_names: Vec<String> = meta
            .get("class_names")
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| {
                Error::bad_file(
                    file.path(),
                    "metadata `class_names` is missing or not a JSON list",
                )
            })?;
        let mut parts = Vec::with_capacity(2);
        let mut shape: Option<ImageShape> = None;
        for part in ["train", "test"] {
            let images_name = format!("{part}.images");
            let pattern: Vec<Option<usize>> = match shape {
                Some(s) => vec![None, Some(s.channels), Some(s.height), Some(s.width)],
                None => vec![None; 4],
            };
            let images = file.read(
                &images_name,
                &TensorSpec::new().dtype(DType::U8).shape(&pattern),
                &Device::Cpu,
            )?;
            let (n, c, h, w) = images.dims4()?;
            let this_shape = ImageShape {
                channels: c,
                height: h,
                width: w,
            };
            shape = Some(this_shape);
            let labels_name = format!("{part}.labels");
            let labels = file.tensor(&labels_name, &Device::Cpu)?;
            qcl_tensor::check_shape(
                &format!("`{labels_name}` of {}", file.path().display()),
                labels.dims(),
                &[Some(n)],
            )?;
            let labels: Vec<u32> = match labels.dtype() {
                DType::U8 | DType::U32 => labels.to_dtype(DType::U32)?.to_vec1::<u32>()?,
                other => {
                    return Err(Error::DTypeMismatch {
                        context: labels_name,
                        expected: DType::U8,
                        actual: other,
                    })
                }
            };
            let pixels = images.flatten_all()?.to_vec1::<u8>()?;
            parts.push(Dataset::new(
                name.clone(),
                this_shape,
                pixels,
                labels,
                class_names.clone(),
            )?);
        }
        let test = parts.pop().expect("two parts");
        let train = parts.pop().expect("two parts");
        SplitDataset::new(train, test)
    }
}

/// Mini-batch order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BatchOrder {
    /// Indices `0, 1, 2, …`.
    #[default]
    Sequential,
    /// A permutation drawn from this seed. Use `seed.child(epoch)` for a new order each epoch.
    Shuffled(qcl_tensor::Seed),
}

/// Options of [`Dataset::batches`], each with a default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchConfig {
    /// Images per batch (default 128).
    pub batch_size: usize,
    /// Order of the images (default sequential).
    pub order: BatchOrder,
    /// Pixel normalisation (default `[0, 1]`).
    pub normalization: Normalization,
    /// Drop a last batch smaller than `batch_size` (default false).
    pub drop_last: bool,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            batch_size: 128,
            order: BatchOrder::Sequential,
            normalization: Normalization::UnitInterval,
            drop_last: false,
        }
    }
}

/// One mini-batch: images `f32 [B, C, H, W]`, labels `u32 [B]`, and the dataset indices.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Normalised images.
    pub images: Tensor,
    /// Labels.
    pub labels: Tensor,
    /// Positions of these images in the data set.
    pub indices: Vec<usize>,
}

/// Iterator over the mini-batches of one pass (see [`Dataset::batches`]).
#[derive(Debug)]
pub struct Batches<'a> {
    dataset: &'a Dataset,
    order: Vec<usize>,
    next: usize,
    options: BatchConfig,
    device: Device,
}

impl Dataset {
    /// One pass over the data set in mini-batches, as candle tensors on `device`.
    ///
    /// ```
    /// use qcl_data::{BatchConfig, BatchOrder, Dataset, ImageShape};
    /// use qcl_tensor::Seed;
    /// let shape = ImageShape { channels: 1, height: 1, width: 1 };
    /// let ds = Dataset::new("n", shape, (0..10).collect(), vec![0; 10], vec!["c".into()])?;
    /// let options = BatchConfig { batch_size: 4, order: BatchOrder::Shuffled(Seed::new(1)), ..Default::default() };
    /// let sizes: Vec<usize> = ds.batches(options, &candle_core::Device::Cpu)?
    ///     .map(|b| b.map(|b| b.indices.len()))
    ///     .collect::<Result<_, _>>()?;
    /// assert_eq!(sizes, vec![4, 4, 2]);
    /// # Ok::<(), qcl_tensor::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a batch size of zero or a bad normalisation.
    pub fn batches(&self, options: BatchConfig, device: &Device) -> Result<Batches<'_>> {
        if options.batch_size == 0 {
            return Err(Error::invalid_parameter("batch_size", "must be at least 1"));
        }
        options.normalization.validate()?;
        let order = match options.order {
            BatchOrder::Sequential => (0..self.len()).collect(),
            BatchOrder::Shuffled(seed) => seed.rng().permutation(self.len()),
        };
        Ok(Batches {
            dataset: self,
            order,
            next: 0,
            options,
            device: device.clone(),
        })
    }
}

impl Batches<'_> {
    /// Number of batches this pass yields in total.
    pub fn num_batches(&self) -> usize {
        let n = self.order.len();
        let b = self.options.batch_size;
        if self.options.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }
}

impl Iterator for Batches<'_> {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        let remaining = self.order.len() - self.next;
        let size = remaining.min(self.options.batch_size);
        if size == 0 || (self.options.drop_last && size < self.options.batch_size) {
            return None;
        }
        let indices = self.order[self.next..self.next + size].to_vec();
        self.next += size;
        Some(
            self.dataset
                .tensors_at(&indices, self.options.normalization, &self.device)
                .map(|(images, labels)| Batch {
                    images,
                    labels,
                    indices,
                }),
        )
    }
}
