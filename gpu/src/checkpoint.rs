//! Checkpoint I/O: safetensors files, models in the Hugging Face layout (`config.json` + `model.safetensors`, or
//! `model-0000i-of-0000n.safetensors` shards with `model.safetensors.index.json` above a size), and atomic checkpoint
//! directories with a `manifest.json` of SHA-256 checksums.
//!
//! Atomicity: everything is written into a hidden temporary sibling directory, every file is fsynced, the directory
//! is renamed into place and the parent is fsynced. A crash leaves either the old state or the complete new
//! directory; a temporary directory left behind is ignored by readers (and removed by the next writer).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::error::{GpuError, Result};
use crate::model::{Llama, LlamaConfig, RopeScaling};

/// HF shards model weights above 5 GB by default (`max_shard_size="5GB"`).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;
pub const MANIFEST: &str = "manifest.json";

/// `(name, tensor)` pairs in file order.
pub type NamedTensors = Vec<(String, Tensor)>;

/// A tensor copied to host memory, ready for safetensors.
struct HostTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl HostTensor {
    fn from_tensor(t: &Tensor) -> Result<Self> {
        let dtype = match t.kind() {
            Kind::Float => Dtype::F32,
            Kind::BFloat16 => Dtype::BF16,
            Kind::Half => Dtype::F16,
            Kind::Double => Dtype::F64,
            Kind::Int64 => Dtype::I64,
            Kind::Int => Dtype::I32,
            Kind::Uint8 => Dtype::U8,
            Kind::Bool => Dtype::BOOL,
            k => return Err(GpuError::Config(format!("no safetensors dtype for {k:?}"))),
        };
        let t = t.detach().to_device(Device::Cpu).contiguous();
        let numel = t.numel();
        let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel)?;
        Ok(HostTensor {
            dtype,
            shape: t.size().iter().map(|&d| d as usize).collect(),
            data,
        })
    }
}

impl View for &HostTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Writes `tensors` (any device) to `path` and fsyncs it. Returns the file size.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<u64> {
    let host: Vec<(String, HostTensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), HostTensor::from_tensor(t)?)))
        .collect::<Result<_>>()?;
    let mut meta = metadata.unwrap_or_default();
    meta.entry("format".into()).or_insert_with(|| "pt".into());
    let bytes =
        safetensors::tensor::serialize(host.iter().map(|(n, h)| (n.as_str(), h)), &Some(meta))
            .map_err(|e| GpuError::Safetensors {
                path: path.into(),
                message: e.to_string(),
            })?;
    write_file_synced(path, &bytes)?;
    Ok(bytes.len() as u64)
}

/// Reads every tensor of a safetensors file (on CPU) and its metadata.
pub fn read_safetensors(path: &Path) -> Result<(NamedTensors, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| GpuError::io(path, e))?;
    let st_err = |m: String| GpuError::Safetensors {
        path: path.into(),
        message: m,
    };
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| st_err(e.to_string()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| st_err(e.to_string()))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype())
            .ok_or_else(|| st_err(format!("{name}: unsupported dtype {:?}", view.dtype())))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        out.push((name, Tensor::f_from_data_size(view.data(), &shape, kind)?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

/// A safetensors file opened for ranged reads: the header is parsed, tensor data is read only where asked (a rank's
/// slice of a large optimizer state without reading the rest).
pub struct SafetensorsRanges {
    path: PathBuf,
    /// Byte offset of the data section.
    data_start: u64,
    file_len: u64,
    header: serde_json::Map<String, serde_json::Value>,
}

impl SafetensorsRanges {
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |m: String| GpuError::Safetensors {
            path: path.into(),
            message: m,
        };
        let mut f = File::open(path).map_err(|e| GpuError::io(path, e))?;
        let file_len = f.metadata().map_err(|e| GpuError::io(path, e))?.len();
        let mut n = [0u8; 8];
        f.read_exact(&mut n).map_err(|_| {
            bad(format!(
                "{file_len} bytes: too short for a safetensors header"
            ))
        })?;
        let n = u64::from_le_bytes(n);
        if n > 100_000_000 || 8 + n > file_len {
            return Err(bad(format!(
                "header of {n} bytes does not fit the file's {file_len} bytes (truncated or not safetensors)"
            )));
        }
        let mut text = vec![0u8; n as usize];
        f.read_exact(&mut text).map_err(|e| GpuError::io(path, e))?;
        let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&text)
            .map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
        Ok(SafetensorsRanges {
            path: path.into(),
            data_start: 8 + n,
            file_len,
            header,
        })
    }

    /// `__metadata__` (string values only).
    pub fn metadata(&self) -> HashMap<String, String> {
        self.header
            .get("__metadata__")
            .and_then(|m| m.as_object())
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Elements `[start, start + len)` of the 1-D F32 tensor `name`, which must hold `total` elements.
    pub fn read_f32_range(&self, name: &str, total: i64, start: i64, len: i64) -> Result<Tensor> {
        let bad = |m: String| GpuError::Safetensors {
            path: self.path.clone(),
            message: format!("{name}: {m}"),
        };
        let e = self.header.get(name).ok_or_else(|| bad("missing".into()))?;
        let dtype = e.get("dtype").and_then(|v| v.as_str()).unwrap_or("?");
        let shape: Vec<i64> = e
            .get("shape")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_i64()).collect())
            .unwrap_or_default();
        let offs: Vec<u64> = e
            .get("data_offsets")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
            .unwrap_or_default();
        if dtype != "F32" || shape != [total] {
            return Err(bad(format!(
                "{dtype} {shape:?}, expected F32 [{total}] (a checkpoint of another model?)"
            )));
        }
        if offs.len() != 2
            || offs[1].checked_sub(offs[0]) != Some(total as u64 * 4)
            || self.data_start + offs[1] > self.file_len
        {
            return Err(bad(format!(
                "data offsets {offs:?} do not hold {total} F32 values inside the file's {} bytes (truncated?)",
                self.file_len
            )));
        }
        if start < 0 || len < 0 || start + len > total {
            return Err(bad(format!("range {start}+{len} outside [0, {total})")));
        }
        use std::io::{Seek, SeekFrom};
        let mut f = File::open(&self.path).map_err(|e| GpuError::io(&self.path, e))?;
        f.seek(SeekFrom::Start(
            self.data_start + offs[0] + start as u64 * 4,
        ))
        .map_err(|e| GpuError::io(&self.path, e))?;
        let mut data = vec![0u8; len as usize * 4];
        f.read_exact(&mut data)
            .map_err(|e| GpuError::io(&self.path, e))?;
        Ok(Tensor::f_from_data_size(&data, &[len], Kind::Float)?)
    }
}

/// A safetensors file written tensor by tensor, chunk by chunk, in the order of its header: for states too large to
/// hold on one host at once.
pub(crate) struct StreamingSafetensors {
    path: std::path::PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    /// `(name, bytes still expected)` in file order.
    pending: Vec<(String, u64)>,
    written: u64,
}

impl StreamingSafetensors {
    /// `tensors`: `(name, elements)` of 1-D F32 tensors, in the order their data will be written.
    pub(crate) fn create(
        path: &Path,
        tensors: &[(&str, i64)],
        mut metadata: HashMap<String, String>,
    ) -> Result<Self> {
        metadata
            .entry("format".into())
            .or_insert_with(|| "pt".into());
        let mut header = serde_json::Map::new();
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata.into_iter().collect::<BTreeMap<_, _>>())
                .expect("metadata is JSON"),
        );
        let mut off = 0u64;
        let mut pending = Vec::new();
        for &(name, n) in tensors {
            let bytes = n as u64 * 4;
            header.insert(
                name.into(),
                serde_json::json!({"dtype": "F32", "shape": [n], "data_offsets": [off, off + bytes]}),
            );
            pending.push((name.to_string(), bytes));
            off += bytes;
        }
        let mut text = serde_json::to_string(&header).expect("header is JSON");
        let pad = (8 - text.len() % 8) % 8;
        text.extend(std::iter::repeat_n(' ', pad));
        let f = std::fs::File::create(path).map_err(|e| GpuError::io(path, e))?;
        let mut file = std::io::BufWriter::with_capacity(8 << 20, f);
        file.write_all(&(text.len() as u64).to_le_bytes())
            .and_then(|_| file.write_all(text.as_bytes()))
            .map_err(|e| GpuError::io(path, e))?;
        Ok(StreamingSafetensors {
            path: path.into(),
            file,
            pending,
            written: 8 + text.len() as u64,
        })
    }

    /// Appends `t` (fp32, any device) to tensor `name`, which must be the one being written.
    pub(crate) fn write(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let bytes = t.numel() as u64 * 4;
        let fits = self
            .pending
            .first()
            .is_some_and(|(n, left)| n == name && *left >= bytes && t.kind() == Kind::Float);
        if !fits {
            return Err(GpuError::checkpoint(
                &self.path,
                format!("internal: {name} data out of order or too long"),
            ));
        }
        let host = t.to_device(Device::Cpu).contiguous();
        let mut data = vec![0u8; bytes as usize];
        host.f_copy_data_u8(&mut data, host.numel())?;
        self.file
            .write_all(&data)
            .map_err(|e| GpuError::io(&self.path, e))?;
        self.written += bytes;
        let done = {
            let p = &mut self.pending[0];
            p.1 -= bytes;
            p.1 == 0
        };
        if done {
            self.pending.remove(0);
        }
        Ok(())
    }

    pub(crate) fn finish(self) -> Result<u64> {
        if let Some((n, left)) = self.pending.first() {
            return Err(GpuError::checkpoint(
                &self.path,
                format!("internal: {n} is {left} bytes short"),
            ));
        }
        let f = self
            .file
            .into_inner()
            .map_err(|e| GpuError::io(&self.path, e.into_error()))?;
        f.sync_all().map_err(|e| GpuError::io(&self.path, e))?;
        Ok(self.written)
    }
}

/// The `transformers_version` written into `config.json`: the 4.x layout lexflow writes (read by every version).
pub const HF_CONFIG_LAYOUT_VERSION: &str = "4.57.1";

/// `config.json` as Hugging Face writes it for `LlamaForCausalLM` (the pre-v5 `rope_scaling` form, which every
/// transformers version reads).
#[derive(Debug, Serialize, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    /// transformers ≥ 5 writes `rope_parameters` (with `rope_theta` inside) instead.
    #[serde(default, skip_serializing)]
    rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    torch_dtype: Option<String>,
    #[serde(default)]
    bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    eos_token_id: Option<serde_json::Value>,
    /// The transformers release whose `config.json` layout this follows (4.x: `rope_scaling`). Without it,
    /// transformers ≥ 5 takes a local tokenizer for a Mistral one with a broken regex and warns falsely.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    transformers_version: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

impl HfConfig {
    fn from_llama(cfg: &LlamaConfig, kind: Kind) -> Self {
        HfConfig {
            architectures: vec!["LlamaForCausalLM".into()],
            model_type: "llama".into(),
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_hidden_layers: cfg.num_hidden_layers,
            num_attention_heads: cfg.num_attention_heads,
            num_key_value_heads: Some(cfg.num_key_value_heads),
            head_dim: Some(cfg.head_dim),
            rms_norm_eps: cfg.rms_norm_eps,
            rope_theta: Some(cfg.rope_theta),
            rope_scaling: cfg.rope_scaling.as_ref().map(|s| {
                serde_json::json!({
                    "rope_type": "llama3",
                    "factor": s.factor,
                    "low_freq_factor": s.low_freq_factor,
                    "high_freq_factor": s.high_freq_factor,
                    "original_max_position_embeddings": s.original_max_position_embeddings,
                })
            }),
            rope_parameters: None,
            max_position_embeddings: cfg.max_position_embeddings,
            tie_word_embeddings: cfg.tie_word_embeddings,
            hidden_act: Some("silu".into()),
            attention_bias: false,
            mlp_bias: false,
            torch_dtype: Some(
                if kind == Kind::BFloat16 {
                    "bfloat16"
                } else {
                    "float32"
                }
                .into(),
            ),
            bos_token_id: None,
            eos_token_id: None,
            transformers_version: Some(HF_CONFIG_LAYOUT_VERSION.into()),
        }
    }

    fn to_llama(&self, path: &Path) -> Result<LlamaConfig> {
        let bad = |m: String| GpuError::checkpoint(path, m);
        if self.attention_bias || self.mlp_bias {
            return Err(bad(
                "attention_bias/mlp_bias models are not supported".into()
            ));
        }
        if self.hidden_act.as_deref().is_some_and(|a| a != "silu") {
            return Err(bad(format!("hidden_act {:?} is not silu", self.hidden_act)));
        }
        let rope = self.rope_scaling.as_ref().or(self.rope_parameters.as_ref());
        let theta = self
            .rope_theta
            .or_else(|| {
                rope.and_then(|r| r.get("rope_theta"))
                    .and_then(|v| v.as_f64())
            })
            .unwrap_or(10_000.0);
        let rope_type = rope
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .and_then(|v| v.as_str());
        let rope_scaling = match rope_type {
            None | Some("default") => None,
            Some("llama3") => {
                let r = rope.expect("rope_type came from it");
                let f = |k: &str| {
                    r.get(k)
                        .and_then(|v| v.as_f64())
                        .ok_or_else(|| bad(format!("rope scaling lacks {k}")))
                };
                Some(RopeScaling {
                    factor: f("factor")?,
                    low_freq_factor: f("low_freq_factor")?,
                    high_freq_factor: f("high_freq_factor")?,
                    original_max_position_embeddings: f("original_max_position_embeddings")?
                        as usize,
                })
            }
            Some(other) => {
                return Err(bad(format!(
                    "rope_type `{other}` is not supported (default, llama3)"
                )))
            }
        };
        let cfg = LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
        };
        cfg.validate().map_err(|e| bad(e.to_string()))?;
        Ok(cfg)
    }
}

pub fn write_hf_config(dir: &Path, cfg: &LlamaConfig, kind: Kind) -> Result<()> {
    let path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&HfConfig::from_llama(cfg, kind)).map_err(|e| {
        GpuError::Json {
            path: path.clone(),
            source: e,
        }
    })?;
    write_file_synced(&path, text.as_bytes())
}

pub fn read_hf_config(dir: &Path) -> Result<LlamaConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| GpuError::io(&path, e))?;
    let hf: HfConfig = serde_json::from_str(&text).map_err(|e| GpuError::Json {
        path: path.clone(),
        source: e,
    })?;
    hf.to_llama(&path)
}

/// Saves `config.json` and the weights in HF layout into `dir` (which must exist). Weights above `max_shard_bytes`
/// are split into `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`. Returns bytes written.
pub fn save_hf(dir: &Path, model: &Llama, max_shard_bytes: u64) -> Result<u64> {
    write_hf_config(dir, &model.cfg, model.kind())?;
    let named = model.params.named();
    let size_of = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
    let total: u64 = named.iter().map(|(_, t)| size_of(t)).sum();
    if total <= max_shard_bytes {
        return write_safetensors(&dir.join("model.safetensors"), &named, None);
    }
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut cur = 0u64;
    for (n, t) in named {
        let s = size_of(&t);
        if cur > 0 && cur + s > max_shard_bytes {
            shards.push(Vec::new());
            cur = 0;
        }
        cur += s;
        shards.last_mut().expect("non-empty").push((n, t));
    }
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut written = 0;
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, count);
        written += write_safetensors(&dir.join(&file), shard, None)?;
        for (n, _) in shard {
            weight_map.insert(n.clone(), file.clone());
        }
    }
    let index =
        serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    let text = serde_json::to_string_pretty(&index).expect("index is JSON");
    write_file_synced(&dir.join("model.safetensors.index.json"), text.as_bytes())?;
    Ok(written + text.len() as u64)
}

/// Reads HF weights (single file or sharded with an index) from `dir`, on CPU.
pub fn read_hf_weights(dir: &Path) -> Result<Vec<(String, Tensor)>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| GpuError::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| GpuError::Json {
            path: index.clone(),
            source: e,
        })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| GpuError::checkpoint(&index, "no weight_map"))?;
        let mut files: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
        files.sort_unstable();
        files.dedup();
        let mut out = Vec::new();
        for f in files {
            out.extend(read_safetensors(&dir.join(f))?.0);
        }
        Ok(out)
    } else {
        Ok(read_safetensors(&dir.join("model.safetensors"))?.0)
    }
}

/// A model from an HF directory (`config.json` + safetensors), cast to `kind` on `device`.
pub fn load_hf(dir: &Path, device: Device, kind: Kind) -> Result<Llama> {
    let cfg = read_hf_config(dir)?;
    let mut model = Llama::new(&cfg, device, kind, 0)?;
    let tied = cfg.tie_word_embeddings;
    model.params.load_named(read_hf_weights(dir)?, tied)?;
    Ok(model)
}

// ---- atomic checkpoint directories -------------------------------------------------------------------------------

fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| GpuError::io(path, e))?;
    f.write_all(bytes).map_err(|e| GpuError::io(path, e))?;
    f.sync_all().map_err(|e| GpuError::io(path, e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| GpuError::io(dir, e))
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| GpuError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| GpuError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    /// File name → `{ sha256, bytes }`.
    pub files: BTreeMap<String, ManifestEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub sha256: String,
    pub bytes: u64,
}

/// Creates `dir` atomically: `fill` writes files into a temporary sibling, then checksums go into `manifest.json`,
/// everything is fsynced and the directory renamed into place (replacing an older `dir`). Returns total bytes.
/// When anything fails (or `fill` panics), the temporary directory is removed: a failed write (a full disk) does not
/// keep holding the space it took.
pub fn write_checkpoint_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<u64> {
    /// Removes the temporary directory unless it was renamed into place.
    struct TmpGuard<'a>(&'a Path, bool);
    impl Drop for TmpGuard<'_> {
        fn drop(&mut self) {
            if !self.1 {
                if let Err(e) = std::fs::remove_dir_all(self.0) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(dir = %self.0.display(), "cannot remove a failed checkpoint's temporary directory: {e}");
                    }
                }
            }
        }
    }
    let parent = dir
        .parent()
        .ok_or_else(|| GpuError::checkpoint(dir, "no parent directory"))?;
    std::fs::create_dir_all(parent).map_err(|e| GpuError::io(parent, e))?;
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| GpuError::checkpoint(dir, "bad name"))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| GpuError::io(&tmp, e))?;
    }
    let mut guard = TmpGuard(&tmp, false);
    std::fs::create_dir_all(&tmp).map_err(|e| GpuError::io(&tmp, e))?;
    fill(&tmp)?;
    let mut files = BTreeMap::new();
    let mut total = 0;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&tmp)
        .map_err(|e| GpuError::io(&tmp, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    entries.sort();
    for p in entries {
        let fname = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        // Files from `fill` may not be synced yet; syncing twice is cheap.
        File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(|e| GpuError::io(&p, e))?;
        let bytes = p.metadata().map_err(|e| GpuError::io(&p, e))?.len();
        total += bytes;
        files.insert(
            fname,
            ManifestEntry {
                sha256: sha256_file(&p)?,
                bytes,
            },
        );
    }
    let text = serde_json::to_string_pretty(&Manifest { files }).expect("manifest is JSON");
    write_file_synced(&tmp.join(MANIFEST), text.as_bytes())?;
    sync_dir(&tmp)?;
    if dir.exists() {
        // Rewriting a step (a resume that goes back past a bad checkpoint): the new directory and the old one trade
        // names in one step, so a crash leaves one complete checkpoint under the name, never none; the old one,
        // now under the temporary name, goes with the guard.
        exchange_dirs(&tmp, dir)?;
        sync_dir(parent)?;
        drop(guard);
    } else {
        std::fs::rename(&tmp, dir).map_err(|e| GpuError::io(dir, e))?;
        guard.1 = true;
        sync_dir(parent)?;
    }
    Ok(total + text.len() as u64)
}

/// Swaps the names of two directories atomically (`renameat2(RENAME_EXCHANGE)`, Linux ≥ 3.15 on the usual
/// filesystems). Where the filesystem cannot, falls back to moving `b` aside, renaming `a` to `b` and the old `b`
/// to `a` — a crash between the renames leaves the old checkpoint under a hidden name next to it.
fn exchange_dirs(a: &Path, b: &Path) -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| {
            CString::new(p.as_os_str().as_bytes())
                .map_err(|_| GpuError::checkpoint(p, "path contains a NUL byte"))
        };
        let (ca, cb) = (c(a)?, c(b)?);
        // SAFETY: two valid NUL-terminated paths, relative to the current directory like `std::fs::rename`.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
            return Err(GpuError::io(b, e));
        }
    }
    let aside = b.with_file_name(format!(
        ".{}.old-{}",
        b.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("checkpoint"),
        std::process::id()
    ));
    std::fs::rename(b, &aside).map_err(|e| GpuError::io(b, e))?;
    std::fs::rename(a, b).map_err(|e| GpuError::io(b, e))?;
    std::fs::rename(&aside, a).map_err(|e| GpuError::io(a, e))
}

/// Checks every file listed in `dir/manifest.json` (size and SHA-256). The error names the first bad file.
pub fn verify_checkpoint_dir(dir: &Path) -> Result<()> {
    let mpath = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&mpath).map_err(|e| GpuError::io(&mpath, e))?;
    let m: Manifest = serde_json::from_str(&text).map_err(|e| GpuError::Json {
        path: mpath.clone(),
        source: e,
    })?;
    if m.files.is_empty() {
        return Err(GpuError::checkpoint(&mpath, "lists no files"));
    }
    for (name, entry) in &m.files {
        let p = dir.join(name);
        let len = p.metadata().map_err(|e| GpuError::io(&p, e))?.len();
        if len != entry.bytes {
            return Err(GpuError::checkpoint(
                &p,
                format!("size {len}, manifest says {}", entry.bytes),
            ));
        }
        let sum = sha256_file(&p)?;
        if sum != entry.sha256 {
            return Err(GpuError::checkpoint(
                &p,
                format!("sha256 {sum}, manifest says {}", entry.sha256),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Llama {
        Llama::new(&LlamaConfig::tiny(40), Device::Cpu, Kind::Float, 3).unwrap()
    }

    #[test]
    fn hf_roundtrip_is_bit_exact_single_and_sharded() {
        let m = tiny();
        for shard in [DEFAULT_MAX_SHARD_BYTES, 20_000] {
            let dir = tempfile::tempdir().unwrap();
            save_hf(dir.path(), &m, shard).unwrap();
            let sharded = dir.path().join("model.safetensors.index.json").exists();
            assert_eq!(sharded, shard < 1_000_000);
            let back = load_hf(dir.path(), Device::Cpu, Kind::Float).unwrap();
            assert_eq!(back.cfg, m.cfg);
            assert!(back.params.flat.equal(&m.params.flat));
        }
    }

    #[test]
    fn bf16_roundtrip() {
        let m = tiny();
        let t = vec![("x".to_string(), m.params.flat.to_kind(Kind::BFloat16))];
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        write_safetensors(&p, &t, None).unwrap();
        let (back, meta) = read_safetensors(&p).unwrap();
        assert_eq!(back[0].1.kind(), Kind::BFloat16);
        assert!(back[0].1.equal(&t[0].1));
        assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
    }

    #[test]
    fn manifest_detects_corruption_and_missing_files() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("step-000001");
        write_checkpoint_dir(&dir, |tmp| write_file_synced(&tmp.join("a.bin"), b"hello")).unwrap();
        verify_checkpoint_dir(&dir).unwrap();
        assert!(!root.path().read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("tmp")));
        std::fs::write(dir.join("a.bin"), b"hellp").unwrap();
        let e = verify_checkpoint_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("a.bin") && e.contains("sha256"), "{e}");
        std::fs::remove_file(dir.join("a.bin")).unwrap();
        assert!(verify_checkpoint_dir(&dir).is_err());
    }

    #[test]
    fn a_failed_write_leaves_no_temporary_directory_and_the_older_checkpoint() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("step-000002");
        write_checkpoint_dir(&dir, |tmp| write_file_synced(&tmp.join("a.bin"), b"old")).unwrap();
        let names = || -> Vec<String> {
            let mut v: Vec<String> = root
                .path()
                .read_dir()
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .collect();
            v.sort();
            v
        };
        // A fill that wrote part of its files and then failed (a full disk): the error comes back, the space is freed.
        let e = write_checkpoint_dir(&dir, |tmp| {
            write_file_synced(&tmp.join("a.bin"), &[7u8; 4096])?;
            Err(GpuError::io(
                tmp.join("b.bin"),
                std::io::Error::other("No space left on device"),
            ))
        })
        .unwrap_err();
        assert!(e.to_string().contains("No space left"), "{e}");
        assert_eq!(names(), ["step-000002"], "temporary directory left behind");
        // A fill that panics (libtorch errors surface as panics): the same.
        let r = std::panic::catch_unwind(|| {
            write_checkpoint_dir(&dir, |tmp| {
                write_file_synced(&tmp.join("a.bin"), b"x")?;
                panic!("libtorch failed")
            })
        });
        assert!(r.is_err());
        assert_eq!(names(), ["step-000002"], "temporary directory left behind");
        // The checkpoint written before is untouched.
        verify_checkpoint_dir(&dir).unwrap();
        assert_eq!(std::fs::read(dir.join("a.bin")).unwrap(), b"old");
    }

    /// Rewriting a step that exists replaces it whole (the new files only, verified) and leaves nothing else; the
    /// swap also works where it has to fall back to renames.
    #[test]
    fn rewriting_a_step_replaces_it_whole() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("step-000003");
        write_checkpoint_dir(&dir, |tmp| {
            write_file_synced(&tmp.join("a.bin"), b"old")?;
            write_file_synced(&tmp.join("stale.bin"), b"only in the old one")
        })
        .unwrap();
        write_checkpoint_dir(&dir, |tmp| write_file_synced(&tmp.join("a.bin"), b"new")).unwrap();
        verify_checkpoint_dir(&dir).unwrap();
        assert_eq!(std::fs::read(dir.join("a.bin")).unwrap(), b"new");
        assert!(!dir.join("stale.bin").exists());
        let names: Vec<String> = root
            .path()
            .read_dir()
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, ["step-000003"]);
        // Both directories keep their contents, under each other's names.
        let (a, b) = (root.path().join("a"), root.path().join("b"));
        for (d, f) in [(&a, "in-a"), (&b, "in-b")] {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join(f), f).unwrap();
        }
        exchange_dirs(&a, &b).unwrap();
        assert!(a.join("in-b").exists() && b.join("in-a").exists());
        assert!(!a.join("in-a").exists() && !b.join("in-b").exists());
    }

    #[test]
    fn reads_transformers_v5_rope_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = serde_json::json!({
            "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        });
        std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
        let c = read_hf_config(dir.path()).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.head_dim, 4);
        assert_eq!(c.rope_scaling.unwrap().factor, 8.0);
    }
}
