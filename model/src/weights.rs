//! Safetensors checkpoints: single files or shards with `model.safetensors.index.json`, memory-mapped and
//! converted one tensor at a time to the backend's float type, so loading needs little more memory than the
//! loaded model. Every tensor taken is checked for presence and shape; what is left over is reported.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::Param;
use burn::tensor::{DType, Device, Distribution, Tensor, TensorData};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::embedding::TokenEmbedding;
use crate::error::{Error, Result};
use crate::fused::panel_matmul;
use crate::host_memory::{convert_in_parallel, zeroed_on_huge_pages};
use crate::linear::Linear;
use crate::load_progress::LoadProgress;
use crate::quant::cache::{CacheTally, Lookup, QuantCache};
use crate::quant::cache_writer::EntryWriter;
use crate::quant::{Quantization, QuantizedMatrix, pack};

/// One memory-mapped safetensors file with its parsed header.
struct Shard {
    path: PathBuf,
    /// The file's full path, size and modification time, for the quantised-weights cache's fingerprints.
    identity: String,
    mmap: Mmap,
    data_start: usize,
    tensors: HashMap<String, TensorEntry>,
}

#[derive(Clone, Debug)]
struct TensorEntry {
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// The tensors of a checkpoint, across all its shards.
pub struct WeightFiles {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// tensor name → shard index
    index: BTreeMap<String, usize>,
}

impl WeightFiles {
    /// Opens the checkpoint in `dir`: `model.safetensors.index.json` when present (every shard it names must
    /// exist), else `model.safetensors`, else every `*.safetensors` file in the folder.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.is_file() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::weights(&index_path, format!("not valid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::weights(&index_path, "missing `weight_map`"))?;
            let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            for name in &names {
                let p = dir.join(name);
                if !p.is_file() {
                    return Err(Error::weights(
                        &p,
                        "shard listed in model.safetensors.index.json is missing",
                    ));
                }
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if dir.join("model.safetensors").is_file() {
            vec![dir.join("model.safetensors")]
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(Error::weights(
                    dir,
                    "no *.safetensors weights in this folder",
                ));
            }
            found
        };
        Self::open_files(dir, &files)
    }

    /// Opens an explicit list of files.
    pub fn open_files(dir: &Path, files: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::with_capacity(files.len());
        let mut index = BTreeMap::new();
        for (i, path) in files.iter().enumerate() {
            let shard = open_shard(path)?;
            for name in shard.tensors.keys() {
                if let Some(prev) = index.insert(name.clone(), i) {
                    return Err(Error::weights(
                        path,
                        format!("tensor `{name}` also appears in {}", files[prev].display()),
                    ));
                }
            }
            shards.push(shard);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            index,
        })
    }

    /// The folder the weights came from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.index
            .get(name)
            .map(|&i| self.shards[i].tensors[name].shape.as_slice())
    }

    /// The stored dtype of the first floating tensor (what `inspect` reports).
    pub fn stored_dtype(&self) -> Option<String> {
        let (name, &i) = self.index.iter().next()?;
        Some(format!("{:?}", self.shards[i].tensors[name].dtype))
    }

    /// Bytes of tensor `name` in its file (0 when absent).
    pub fn tensor_bytes(&self, name: &str) -> u64 {
        self.index.get(name).map_or(0, |&i| {
            let e = &self.shards[i].tensors[name];
            (e.end - e.start) as u64
        })
    }

    /// Bytes of every tensor in the checkpoint.
    pub fn total_bytes(&self) -> u64 {
        self.index.keys().map(|name| self.tensor_bytes(name)).sum()
    }

    /// A loader that creates tensors of `dtype` on `device`.
    pub fn loader(&self, device: &Device, dtype: DType) -> WeightLoader<'_> {
        WeightLoader {
            files: Some(self),
            device: device.clone(),
            dtype,
            used: HashSet::new(),
            quantization: Quantization::None,
            cache: None,
            writer: None,
            tally: CacheTally::default(),
            progress: None,
        }
    }

    /// What identifies tensor `name`'s stored values short of reading them: its file with the file's size
    /// and modification time, its type, shape and place in the file.
    fn fingerprint(&self, name: &str) -> Option<String> {
        let shard = &self.shards[*self.index.get(name)?];
        let e = &shard.tensors[name];
        Some(format!(
            "{name} {:?} {:?} at {}..{} of {}",
            e.dtype, e.shape, e.start, e.end, shard.identity
        ))
    }

    /// Reads a tensor as f32 values (host), checking its shape.
    fn read_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let mut values = zeroed_on_huge_pages::<f32>(expected.iter().product());
        self.read_f32_into(name, expected, &mut values)?;
        Ok(values)
    }

    /// [`Self::read_f32`] into `out` (`expected`'s size), converted on all cores.
    fn read_f32_into(&self, name: &str, expected: &[usize], out: &mut [f32]) -> Result<()> {
        let &i = self.index.get(name).ok_or_else(|| {
            Error::weights(
                &self.dir,
                format!("missing tensor `{name}` (expected shape {expected:?})"),
            )
        })?;
        let shard = &self.shards[i];
        let entry = &shard.tensors[name];
        if entry.shape != expected {
            return Err(Error::weights(
                &shard.path,
                format!(
                    "tensor `{name}` has shape {:?}, expected {expected:?}",
                    entry.shape
                ),
            ));
        }
        let (start, end) = (shard.data_start + entry.start, shard.data_start + entry.end);
        let bytes = &shard.mmap[start..end];
        match entry.dtype {
            Dtype::F32 => convert_in_parallel(bytes, 4, out, |b| {
                f32::from_le_bytes([b[0], b[1], b[2], b[3]])
            }),
            Dtype::F16 => convert_in_parallel(bytes, 2, out, |b| {
                half::f16::from_le_bytes([b[0], b[1]]).to_f32()
            }),
            Dtype::BF16 => convert_in_parallel(bytes, 2, out, |b| {
                half::bf16::from_le_bytes([b[0], b[1]]).to_f32()
            }),
            other => {
                return Err(Error::weights(
                    &shard.path,
                    format!(
                        "tensor `{name}` is {other:?}; only F32, F16 and BF16 weights are supported"
                    ),
                ));
            }
        }
        release_pages(&shard.mmap, start, end);
        Ok(())
    }
}

/// Drops the mapped pages of a tensor already converted, so the file's pages do not stay resident beside
/// the loaded model (which would double peak memory).
fn release_pages(mmap: &Mmap, start: usize, end: usize) {
    #[cfg(unix)]
    {
        const PAGE: usize = 4096;
        let aligned = start / PAGE * PAGE;
        // SAFETY: the map is a read-only file mapping and no slice into this range outlives the caller's
        // conversion; dropped pages are read again from the file if anything touches them later.
        let _ = unsafe {
            mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, aligned, end - aligned)
        };
    }
    #[cfg(not(unix))]
    let _ = (mmap, start, end);
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let full = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let identity = format!(
        "{} ({} bytes, modified {modified} ns after the epoch)",
        full.display(),
        meta.len()
    );
    // SAFETY: the map is read-only; a checkpoint modified on disk while we run is not supported.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
        let hint = match e {
            safetensors::SafeTensorError::MetadataIncompleteBuffer => {
                "file is truncated or has trailing bytes"
            }
            safetensors::SafeTensorError::HeaderTooSmall
            | safetensors::SafeTensorError::InvalidHeaderLength => "file is too short or truncated",
            _ => "not a valid safetensors file",
        };
        Error::weights(path, format!("{hint} ({e})"))
    })?;
    let tensors = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let entry = TensorEntry {
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: info.data_offsets.0,
                end: info.data_offsets.1,
            };
            (name, entry)
        })
        .collect();
    Ok(Shard {
        path: path.to_path_buf(),
        identity,
        mmap,
        data_start: 8 + header_len,
        tensors,
    })
}

/// Creates Burn parameters from checkpoint tensors, remembering which were used; or, without files, random
/// parameters of the requested shapes (benchmarks of model shapes no one has to download).
pub struct WeightLoader<'a> {
    files: Option<&'a WeightFiles>,
    device: Device,
    dtype: DType,
    used: HashSet<String>,
    quantization: Quantization,
    /// Where quantised matrices are kept between loads (checkpoints only).
    cache: Option<QuantCache>,
    /// Writes new entries while the load goes on (started by the first one).
    writer: Option<EntryWriter>,
    tally: CacheTally,
    progress: Option<Arc<LoadProgress>>,
}

impl WeightLoader<'static> {
    /// A loader that makes up every tensor: normal(0, 0.02) weights, unit norm scales, zero biases (so
    /// activations stay in a realistic range). On the CPU backend the weights are the same on every run
    /// (drawn per tensor name on the host); elsewhere, seed the device's generator for repeatable ones.
    pub fn random(device: &Device, dtype: DType) -> Self {
        WeightLoader {
            files: None,
            device: device.clone(),
            dtype,
            used: HashSet::new(),
            quantization: Quantization::None,
            cache: None,
            writer: None,
            tally: CacheTally::default(),
            progress: None,
        }
    }
}

impl WeightLoader<'_> {
    /// The device tensors are created on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The float type tensors are created in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Quantises the weight matrices loaded from now on (linear layers and embedding tables; never norms,
    /// biases or position embeddings).
    pub fn set_quantization(&mut self, quantization: Quantization) {
        self.quantization = quantization;
    }

    /// The quantisation applied to weight matrices loaded now.
    pub fn quantization(&self) -> Quantization {
        self.quantization
    }

    /// Keeps quantised matrices in a cache under `root` ([`crate::quant::cache`]), one folder per
    /// checkpoint; `None`: quantise at every load. Random weights are never cached.
    pub fn set_quant_cache(&mut self, root: Option<&Path>) {
        self.cache = root
            .zip(self.files)
            .map(|(root, files)| QuantCache::for_model(root, files.dir()));
    }

    /// The cache's root folder, if quantised matrices are cached (for another checkpoint folder's loader).
    pub fn quant_cache_root(&self) -> Option<&Path> {
        self.cache.as_ref().and_then(|c| c.dir().parent())
    }

    /// Reports the tensors taken from now on to `progress`, adding this checkpoint's bytes to its total.
    pub fn set_progress(&mut self, progress: Option<Arc<LoadProgress>>) {
        if let (Some(p), Some(files)) = (&progress, self.files) {
            p.add_total(files.total_bytes());
        }
        self.progress = progress;
    }

    /// The progress this loader reports to (for another checkpoint folder's loader).
    pub fn progress(&self) -> Option<Arc<LoadProgress>> {
        self.progress.clone()
    }

    /// Records tensor `name` as taken from the checkpoint (and its bytes as progress).
    fn mark_used(&mut self, name: &str) {
        if self.used.insert(name.to_string())
            && let (Some(p), Some(files)) = (&self.progress, self.files)
        {
            p.advance(files.tensor_bytes(name));
        }
    }

    /// What this load did with the quantised-weights cache, `None` without one; waits for the entries
    /// still being written.
    pub fn cache_tally(&mut self) -> Option<CacheTally> {
        if let Some(writer) = self.writer.take() {
            let outcome = writer.finish();
            self.tally.written += outcome.written;
            if self.tally.write_error.is_none() {
                self.tally.write_error = outcome.error;
            }
        }
        self.cache.as_ref().map(|_| self.tally.clone())
    }

    /// Whether the checkpoint holds `name` (a random loader holds everything).
    pub fn contains(&self, name: &str) -> bool {
        self.files.is_none_or(|f| f.contains(name))
    }

    /// A tensor of exactly `shape`.
    pub fn tensor<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        let Some(files) = self.files else {
            return Ok(self.made_up(name, shape));
        };
        let values = files.read_f32(name, &shape)?;
        self.mark_used(name);
        Ok(self.upload(values, shape.to_vec()))
    }

    fn made_up<const D: usize>(&self, name: &str, shape: [usize; D]) -> Tensor<D> {
        let norm_scale = name.ends_with("norm.weight")
            || name.ends_with("layernorm.weight")
            || name.ends_with("layrnorm.weight");
        if norm_scale {
            Tensor::ones(shape, (&self.device, self.dtype))
        } else if name.ends_with(".bias") {
            Tensor::zeros(shape, (&self.device, self.dtype))
        } else if crate::kernels::on_cpu(&self.device) {
            // Burn's generator draws one value at a time on one core (~3.5 s of the `base` shape's
            // load); the host generator uses every core, and is the same on every machine.
            self.upload(random_host(name, shape.iter().product()), shape.to_vec())
        } else {
            Tensor::<D>::random(shape, Distribution::Normal(0.0, 0.02), &self.device)
                .cast(self.dtype)
        }
    }

    /// A PyTorch `nn.Linear` (`{prefix}.weight` [out, in], optional `{prefix}.bias`) as a Burn [`Linear`]
    /// (weight stored [in, out]).
    pub fn linear(
        &mut self,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
    ) -> Result<Linear> {
        self.fused_linear(&[prefix.to_string()], d_in, &[d_out], bias)
    }

    /// Several PyTorch `nn.Linear`s with the same input, fused into one [`Linear`] whose outputs are theirs
    /// side by side (q, k and v; gate and up): one matrix product instead of several. Weights are quantised
    /// here when the loader is set to and the input width allows.
    pub fn fused_linear(
        &mut self,
        prefixes: &[String],
        d_in: usize,
        d_outs: &[usize],
        bias: bool,
    ) -> Result<Linear> {
        let bits = self.quantization.linear_bits();
        self.linear_with_bits(prefixes, d_in, d_outs, bias, bits)
    }

    /// The language model's output head `{prefix}.weight` [vocab, d], quantised one step finer than the
    /// other matrices ([`Quantization::head_bits`]).
    pub fn output_head(&mut self, prefix: &str, d: usize, vocab: usize) -> Result<Linear> {
        let bits = self.quantization.head_bits();
        self.linear_with_bits(&[prefix.to_string()], d, &[vocab], false, bits)
    }

    /// [`Self::fused_linear`] with codes of `bits` (`None`: the float type) when the input width allows.
    fn linear_with_bits(
        &mut self,
        prefixes: &[String],
        d_in: usize,
        d_outs: &[usize],
        bias: bool,
        bits: Option<usize>,
    ) -> Result<Linear> {
        let total: usize = d_outs.iter().sum();
        let bits = bits.filter(|_| pack::packable(d_in));
        let Some(files) = self.files else {
            let name = format!("{}.weight", prefixes[0]);
            let bias = bias.then(|| self.made_up(".bias", [total]));
            return Ok(match bits {
                Some(bits) => {
                    let rows = random_host(&name, total * d_in);
                    Linear::quantized(self.quantized(&rows, total, d_in, bits), bias)
                }
                None if self.rows_layout() => {
                    Linear::float_rows(self.made_up(&name, [total, d_in]), bias)
                }
                // `made_up`'s values for `[in, out]`, drawn into panels.
                None if panel_matmul::wanted(&self.device, self.dtype, total) => {
                    let panels = random_panels(&name, d_in, total);
                    self.panel_linear(panels, d_in, total, bias)
                }
                None => Linear::float(self.made_up(&name, [d_in, total]), bias),
            });
        };
        let names: Vec<String> = prefixes.iter().map(|p| format!("{p}.weight")).collect();
        let mut biases = Vec::with_capacity(total);
        if bias {
            for (prefix, &d_out) in prefixes.iter().zip(d_outs) {
                let name = format!("{prefix}.bias");
                biases.extend(files.read_f32(&name, &[d_out])?);
                self.mark_used(&name);
            }
        }
        let bias = bias.then(|| self.upload(biases, vec![total]));
        if let Some(bits) = bits {
            let matrix = self.quantized_from_files(files, &names, d_outs, d_in, bits)?;
            return Ok(Linear::quantized(matrix, bias));
        }
        // The parts' [out, in] matrices one after another are the fused [total, in] matrix.
        let rows = self.read_stacked(files, &names, d_outs, d_in)?;
        Ok(if self.rows_layout() {
            Linear::float_rows(self.upload(rows, vec![total, d_in]), bias)
        } else if panel_matmul::wanted(&self.device, self.dtype, total) {
            // Straight from PyTorch's rows: never laid out `[in, out]` first.
            let panels = panel_matmul::from_rows(&rows, total, d_in);
            self.panel_linear(panels, d_in, total, bias)
        } else {
            let weight = self.upload(transpose(&rows, total, d_in), vec![d_in, total]);
            Linear::float(weight, bias)
        })
    }

    /// A layer whose weight `[d_in, total]` is `panels` ([`panel_matmul`]).
    fn panel_linear(
        &self,
        panels: Vec<f32>,
        d_in: usize,
        total: usize,
        bias: Option<Tensor<1>>,
    ) -> Linear {
        Linear::panels(
            panel_matmul::upload(panels, d_in, total, &self.device),
            bias,
        )
    }

    /// Whether float linear weights are kept a row per output, `[out, in]`, as the one-row product kernel
    /// of decoding reads them ([`crate::fused::row_matmul`]): on CubeCL devices. The CPU keeps `[in, out]`,
    /// the layout its product is fastest with.
    fn rows_layout(&self) -> bool {
        crate::kernels::on_cube(&self.device)
    }

    /// An embedding table `{name}` [n, d], quantised when the loader is set to and `d` allows; `tied`: it
    /// is also the output head.
    pub fn embedding(
        &mut self,
        name: &str,
        n: usize,
        d: usize,
        tied: bool,
    ) -> Result<TokenEmbedding> {
        let bits = self
            .quantization
            .embedding_bits(tied)
            .filter(|_| pack::packable(d));
        Ok(match bits {
            // Quantised from the host values: never uploaded in f32 first.
            Some(bits) => TokenEmbedding::Quantized(match self.files {
                Some(files) => {
                    self.quantized_from_files(files, &[name.to_string()], &[n], d, bits)?
                }
                None => self.quantized(&random_host(name, n * d), n, d, bits),
            }),
            None => TokenEmbedding::Float(Param::from_tensor(self.tensor(name, [n, d])?)),
        })
    }

    /// The checkpoint's `[d_outs[i], d_in]` tensors `names` one after another: the fused `[Σ d_outs, d_in]`
    /// matrix, as f32 values on the host.
    fn read_stacked(
        &mut self,
        files: &WeightFiles,
        names: &[String],
        d_outs: &[usize],
        d_in: usize,
    ) -> Result<Vec<f32>> {
        // Each part converted straight into its rows: no second pass over the whole matrix.
        let mut rows = zeroed_on_huge_pages::<f32>(d_in * d_outs.iter().sum::<usize>());
        let mut rest = rows.as_mut_slice();
        for (name, &d_out) in names.iter().zip(d_outs) {
            let (part, after) = rest.split_at_mut(d_out * d_in);
            files.read_f32_into(name, &[d_out, d_in], part)?;
            self.mark_used(name);
            rest = after;
        }
        Ok(rows)
    }

    /// The matrix of the checkpoint's tensors `names` (`[d_outs[i], d_in]` each) stacked, quantised to
    /// `bits`: read from the quantised-weights cache when it holds them, else quantised (and cached).
    fn quantized_from_files(
        &mut self,
        files: &WeightFiles,
        names: &[String],
        d_outs: &[usize],
        d_in: usize,
        bits: usize,
    ) -> Result<QuantizedMatrix> {
        let total: usize = d_outs.iter().sum();
        // Only tensors present with the expected shapes are looked up: anything else fails below, naming
        // the tensor, as it would without a cache.
        let sources: Option<Vec<String>> = names
            .iter()
            .zip(d_outs)
            .map(|(name, &d_out)| {
                (files.shape(name) == Some(&[d_out, d_in][..]))
                    .then(|| files.fingerprint(name))
                    .flatten()
            })
            .collect();
        let entry = self.cache.as_ref().zip(sources).map(|(cache, sources)| {
            let matrix = [total, d_in];
            let entry = cache.entry(
                &names[0],
                names.len(),
                matrix,
                bits,
                self.dtype,
                &sources.join("; "),
            );
            (cache.clone(), entry)
        });
        if let Some((cache, entry)) = &entry {
            match cache.read(entry) {
                Lookup::Hit(packed) => {
                    for name in names {
                        self.mark_used(name);
                    }
                    self.tally.read += 1;
                    return Ok(QuantizedMatrix::upload(packed, &self.device, self.dtype));
                }
                Lookup::Missing => {}
                Lookup::Stale => {
                    tracing::debug!(file = %entry.file().display(), "quantised-weights cache entry is stale")
                }
                Lookup::Unreadable(why) => tracing::warn!(
                    "{}: unreadable quantised-weights cache entry ({why}); quantising again and replacing it",
                    entry.file().display()
                ),
            }
        }
        let rows = self.read_stacked(files, names, d_outs, d_in)?;
        let packed = pack::quantize(&rows, total, d_in, bits, self.dtype);
        drop(rows);
        self.tally.quantized += 1;
        if let Some((cache, entry)) = &entry {
            let writer = self.writer.get_or_insert_with(EntryWriter::start);
            writer.submit(cache, entry, &packed);
        }
        Ok(QuantizedMatrix::upload(packed, &self.device, self.dtype))
    }

    fn quantized(&self, rows: &[f32], n: usize, d: usize, bits: usize) -> QuantizedMatrix {
        let packed = pack::quantize(rows, n, d, bits, self.dtype);
        QuantizedMatrix::upload(packed, &self.device, self.dtype)
    }

    fn upload<const D: usize>(&self, values: Vec<f32>, shape: Vec<usize>) -> Tensor<D> {
        let data = match self.dtype {
            DType::F16 => {
                TensorData::new(values.into_iter().map(half::f16::from_f32).collect(), shape)
            }
            DType::BF16 => TensorData::new(
                values.into_iter().map(half::bf16::from_f32).collect(),
                shape,
            ),
            _ => TensorData::new(values, shape),
        };
        Tensor::from_data(data, (&self.device, self.dtype))
    }

    /// Fails when the checkpoint holds tensors nothing took, except those `ignorable` accepts (parts of the
    /// checkpoint this model does not run, such as vision layers after the selected one).
    pub fn finish(self, ignorable: impl Fn(&str) -> bool) -> Result<Vec<String>> {
        let mut ignored = Vec::new();
        let mut unexpected = Vec::new();
        let Some(files) = self.files else {
            return Ok(ignored);
        };
        for name in files.names() {
            if self.used.contains(name) {
                continue;
            }
            if ignorable(name) {
                ignored.push(name.to_string())
            } else {
                unexpected.push(name.to_string())
            }
        }
        if !unexpected.is_empty() {
            let shown: Vec<&str> = unexpected.iter().take(5).map(String::as_str).collect();
            return Err(Error::weights(
                &files.dir,
                format!(
                    "{} unexpected tensor(s) in the checkpoint, e.g. `{}`; is this the right layout or config?",
                    unexpected.len(),
                    shown.join("`, `")
                ),
            ));
        }
        Ok(ignored)
    }
}

/// Random weights for `name` (≈ N(0, 0.02), like [`WeightLoader::made_up`]'s) made on the host, where the
/// quantiser takes them, by all cores: drawing them on the device and reading them back took most of the
/// 72 s a random 7B model took to load with `--quant int4` on an H200 machine. Deterministic per name.
fn random_host(name: &str, len: usize) -> Vec<f32> {
    random_values(name_seed(name), len)
}

/// FNV-1a of a tensor's name: each matrix its own stream.
fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `len` random values ≈ N(0, 0.02) from `seed` (each the sum of four 16-bit uniforms: close enough to a
/// Gaussian for weights and rounding statistics), drawn by all cores; the same for the same seed on any
/// machine.
pub fn random_values(seed: u64, len: usize) -> Vec<f32> {
    let mut out = zeroed_on_huge_pages::<f32>(len);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = len.div_ceil(RANDOM_STRETCH).div_ceil(threads).max(1) * RANDOM_STRETCH;
    std::thread::scope(|scope| {
        for (t, part) in out.chunks_mut(per_thread).enumerate() {
            scope.spawn(move || {
                for (j, stretch) in part.chunks_mut(RANDOM_STRETCH).enumerate() {
                    draw_stretch(seed, t * per_thread / RANDOM_STRETCH + j, stretch);
                }
            });
        }
    });
    out
}

/// Values per stream of [`random_values`], whatever the number of cores: the same values everywhere.
const RANDOM_STRETCH: usize = 1 << 16;

/// Stretch `index` of [`random_values`]`(seed, ..)` into `stretch` (at most [`RANDOM_STRETCH`] values).
///
/// Each value hashes its own position (SplitMix64's finaliser over a counter) rather than stepping a
/// generator: no value waits on the one before, so a core draws ~3× faster than it did chaining four
/// xorshift steps per value, which was most of a random model's load.
fn draw_stretch(seed: u64, index: usize, stretch: &mut [f32]) {
    const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
    let base = seed ^ (index as u64).wrapping_mul(GOLDEN).rotate_left(32);
    // Four uniforms on [0, 65536) sum to a mean of 131,070 and a variance of 4 · 65536² / 12: scaled to a
    // 0.02 deviation.
    let scale = 0.02 * 3f32.sqrt() / 65536.0;
    for (i, v) in stretch.iter_mut().enumerate() {
        let mut z = base.wrapping_add((i as u64 + 1).wrapping_mul(GOLDEN));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let (lo, hi) = (z as u32, (z >> 32) as u32);
        let sum = (lo & 0xffff) + (lo >> 16) + (hi & 0xffff) + (hi >> 16);
        *v = (sum as i32 - 131_070) as f32 * scale;
    }
}

/// [`random_host`]`(name, k · n)` read as a `[k, n]` weight, in column panels ([`panel_matmul`]): each
/// stretch written into place as it is drawn, without the `[k, n]` copy first.
fn random_panels(name: &str, k: usize, n: usize) -> Vec<f32> {
    let seed = name_seed(name);
    panel_matmul::from_stretches(k, n, RANDOM_STRETCH, |index, values| {
        draw_stretch(seed, index, values)
    })
}

/// Row-major [rows, cols] → [cols, rows], blocked for cache friendliness.
fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const B: usize = 32;
    let mut dst = zeroed_on_huge_pages::<f32>(src.len());
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A random model's float weights on the CPU are the host generator's for their names: the same on
    /// every load (and what the quantiser takes for the same names), not the device generator's.
    #[cfg(feature = "cpu")]
    #[test]
    fn random_float_weights_on_the_cpu_come_from_the_host_generator() {
        let device = Device::flex();
        let name = "model.layers.0.mlp.down_proj.weight";
        let made = |dtype| {
            let mut w = WeightLoader::random(&device, dtype);
            w.tensor(name, [3, 70])
                .unwrap()
                .into_data()
                .convert::<f32>()
        };
        let want = TensorData::new(random_host(name, 210), [3, 70]);
        made(DType::F32).assert_eq(&want, true);
        made(DType::F32).assert_eq(&made(DType::F32), true);
        // Norm scales and biases are still ones and zeros.
        let mut w = WeightLoader::random(&device, DType::F32);
        let ones = w.tensor("model.norm.weight", [4]).unwrap().into_data();
        ones.assert_eq(&TensorData::new(vec![1.0f32; 4], [4]), true);
    }

    /// A random model's float linear layer multiplies by the host generator's values laid out `[in, out]`
    /// whatever layout this CPU keeps it in (column panels on AVX2-only CPUs, `[in, out]` elsewhere).
    #[cfg(feature = "cpu")]
    #[test]
    fn random_linear_layers_hold_the_same_weights_in_any_layout() {
        let device = Device::flex();
        let (d_in, d_out) = (40, 48);
        let layer = WeightLoader::random(&device, DType::F32)
            .linear("model.layers.0.mlp.up_proj", d_in, d_out, false)
            .unwrap();
        let w = Tensor::<2>::from_data(
            TensorData::new(
                random_host("model.layers.0.mlp.up_proj.weight", d_in * d_out),
                [d_in, d_out],
            ),
            &device,
        );
        let x = Tensor::<2>::from_data(
            TensorData::new(random_host("x", 3 * d_in), [3, d_in]),
            &device,
        );
        layer
            .forward(x.clone())
            .into_data()
            .assert_approx_eq::<f32>(
                &x.matmul(w).into_data(),
                burn::tensor::Tolerance::absolute(1e-6),
            );
    }

    #[test]
    fn host_random_weights_are_small_centred_and_repeatable() {
        let a = random_host("model.layers.0.mlp.down_proj.weight", 300_001);
        assert_eq!(
            a,
            random_host("model.layers.0.mlp.down_proj.weight", 300_001)
        );
        assert_ne!(
            a[..64],
            random_host("model.layers.1.mlp.down_proj.weight", 64)[..]
        );
        let n = a.len() as f64;
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / n;
        let sd = (a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(mean.abs() < 1e-3, "mean {mean}");
        assert!((sd - 0.02).abs() < 1e-3, "standard deviation {sd}");
        assert!(
            a.iter().all(|v| v.abs() < 0.07),
            "beyond four uniforms' reach"
        );
        // Streams by position, not by core: a shorter draw is the start of a longer one.
        assert_eq!(
            random_values(7, 200_000)[..70_000],
            random_values(7, 70_000)[..]
        );
    }

    #[test]
    fn transpose_is_exact() {
        let src: Vec<f32> = (0..(70 * 45)).map(|x| x as f32).collect();
        let t = transpose(&src, 70, 45);
        for r in 0..70 {
            for c in 0..45 {
                assert_eq!(t[c * 70 + r], src[r * 45 + c]);
            }
        }
    }

    fn scratch(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("llava-med-weights-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn half_precision_weights_convert_exactly_and_other_types_are_refused() {
        let dir = scratch("dtypes");
        let vals = [0.5f32, -1.25, 3.0, 1e-3];
        let bf: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let f16: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let ints: Vec<u8> = [1i64, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
        let views = vec![
            (
                "a",
                safetensors::tensor::TensorView::new(Dtype::BF16, vec![2, 2], &bf).unwrap(),
            ),
            (
                "b",
                safetensors::tensor::TensorView::new(Dtype::F16, vec![2, 2], &f16).unwrap(),
            ),
            (
                "c",
                safetensors::tensor::TensorView::new(Dtype::I64, vec![2], &ints).unwrap(),
            ),
        ];
        std::fs::write(
            dir.join("model.safetensors"),
            safetensors::serialize(views, None).unwrap(),
        )
        .unwrap();
        let files = WeightFiles::open_dir(&dir).unwrap();
        let device = Device::default();
        for dtype in [DType::F32, DType::F16] {
            let mut w = files.loader(&device, dtype);
            let mut read = |name: &str, shape: [usize; 2]| -> Vec<f32> {
                let t = w.tensor(name, shape).unwrap().cast(DType::F32);
                t.into_data().convert::<f32>().try_into_vec().unwrap()
            };
            let a = read("a", [2, 2]);
            let b = read("b", [2, 2]);
            let want_b: Vec<f32> = vals
                .iter()
                .map(|v| half::f16::from_f32(*v).to_f32())
                .collect();
            assert_eq!(b, want_b);
            if dtype == DType::F32 {
                let want_a: Vec<f32> = vals
                    .iter()
                    .map(|v| half::bf16::from_f32(*v).to_f32())
                    .collect();
                assert_eq!(a, want_a);
            }
            let err = w.tensor::<1>("c", [2]).unwrap_err().to_string();
            assert!(err.contains("`c` is I64"), "{err}");
            let err = w.tensor::<1>("a", [4]).unwrap_err().to_string();
            assert!(err.contains("`a` has shape [2, 2], expected [4]"), "{err}");
            let err = w.finish(|_| false).unwrap_err().to_string();
            assert!(
                err.contains("unexpected tensor") && err.contains("`c`"),
                "{err}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn truncated_file_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("llava-med-trunc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-llava-hf-llama/model.safetensors");
        let bytes = std::fs::read(src).unwrap();
        std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
        let err = WeightFiles::open_dir(&dir).err().unwrap().to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("truncated"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
