//! GGUF, llama.cpp's model file: a checked reader and a writer of the container (header, typed
//! metadata, tensor directory, aligned data), and the conversion of the llama architecture to and from
//! [`Llama`] — Q8_0, Q4_0 and Q4_1 tensors are byte for byte Starling's own blocks (kept as they are,
//! so a quantized round trip is bit-exact); every other type is decoded as ggml's reference does. Query and key rows are permuted as llama.cpp's converter
//! does (GGUF keeps RoPE's pairs interleaved; HuggingFace halves them).
//!
//! Every count, length and offset read from a file is bounded and checked before anything is allocated
//! for it; a malformed or truncated file is a [`ModelError::Gguf`]. What must never live here: running
//! the model.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::Device;

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::lora::Target;
use crate::model::{Block, Frozen, Llama};
use crate::quant::{QMatrix, QuantType};
use crate::tokenizer::{Tokenizer, BYTE_BOS, BYTE_EOS, BYTE_PAD, BYTE_VOCAB};

const MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of tensor data written (and the default when a file does not say).
pub const ALIGNMENT: u64 = 32;
const MAX_ENTRIES: u64 = 1 << 20;
const MAX_STRING: u64 = 16 << 20;
const MAX_DIM: u64 = 1 << 40;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// uint8.
    U8(u8),
    /// int8.
    I8(i8),
    /// uint16.
    U16(u16),
    /// int16.
    I16(i16),
    /// uint32.
    U32(u32),
    /// int32.
    I32(i32),
    /// float32.
    F32(f32),
    /// bool.
    Bool(bool),
    /// UTF-8 string.
    Str(String),
    /// Array of values of one type.
    Array(Vec<Value>),
    /// uint64.
    U64(u64),
    /// int64.
    I64(i64),
    /// float64.
    F64(f64),
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// The value as an unsigned integer, if it is one.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a number (an f32 as the decimal it was written from: 1e-5 stays
    /// 1e-5, not 9.99999974e-6).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => v.to_string().parse().ok(),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
}

/// The tensor types this module reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// float32.
    F32,
    /// float16.
    F16,
    /// 4-bit blocks of 32 with an f16 scale.
    Q4_0,
    /// 8-bit blocks of 32 with an f16 scale.
    Q8_0,
    /// 5-bit blocks of 32 with an f16 scale (what Q4_K_M files hold where a row is not a
    /// multiple of 256); read by dequantizing.
    Q5_0,
    /// 4-bit super-blocks of 256 with 6-bit scales and mins; read by dequantizing.
    Q4K,
    /// 6-bit super-blocks of 256 with 8-bit scales; read by dequantizing.
    Q6K,
    /// bfloat16 (the high half of a float32).
    BF16,
    /// 4-bit blocks of 32 with an f16 scale and an f16 minimum; read by dequantizing.
    Q4_1,
    /// 5-bit blocks of 32 with an f16 scale and an f16 minimum; read by dequantizing.
    Q5_1,
    /// 2-bit super-blocks of 256 with 4-bit scales and mins; read by dequantizing.
    Q2K,
    /// 3-bit super-blocks of 256 with 6-bit signed scales; read by dequantizing.
    Q3K,
    /// 5-bit super-blocks of 256 with 6-bit scales and mins; read by dequantizing.
    Q5K,
}

impl GgmlType {
    fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q8_0 => 8,
            GgmlType::Q5_0 => 6,
            GgmlType::Q4K => 12,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_1 => 7,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q5K => 13,
        }
    }

    /// Values per block and bytes per block of a block format (`None` for F32/F16).
    fn block(self) -> Option<(u64, u64)> {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => None,
            GgmlType::Q4_0 => Some((32, 18)),
            GgmlType::Q8_0 => Some((32, 34)),
            GgmlType::Q5_0 => Some((32, 22)),
            GgmlType::Q4K => Some((256, 144)),
            GgmlType::Q6K => Some((256, 210)),
            GgmlType::Q4_1 => Some((32, 20)),
            GgmlType::Q5_1 => Some((32, 24)),
            GgmlType::Q2K => Some((256, 84)),
            GgmlType::Q3K => Some((256, 110)),
            GgmlType::Q5K => Some((256, 176)),
        }
    }

    fn from_id(id: u32) -> std::result::Result<Self, String> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            8 => GgmlType::Q8_0,
            6 => GgmlType::Q5_0,
            12 => GgmlType::Q4K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            3 => GgmlType::Q4_1,
            7 => GgmlType::Q5_1,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            13 => GgmlType::Q5K,
            other => {
                return Err(format!(
                    "tensor type {other} is not supported (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, \
                     Q8_0, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K are)"
                ))
            }
        })
    }

    /// Bytes of `n` values laid out along rows of `row` values (`None`: not a whole number of blocks).
    fn bytes(self, n: u64, row: u64) -> Option<u64> {
        match self {
            GgmlType::F32 => n.checked_mul(4),
            GgmlType::F16 | GgmlType::BF16 => n.checked_mul(2),
            _ => {
                let (values, bytes) = self.block()?;
                if !row.is_multiple_of(values) {
                    return None;
                }
                (n / values).checked_mul(bytes)
            }
        }
    }
}

/// One tensor of the directory.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Its name (`token_embd.weight`, `blk.0.attn_q.weight`, ...).
    pub name: String,
    /// Its dimensions, innermost first (GGUF's `ne`: `[cols, rows]` for a matrix).
    pub dims: Vec<u64>,
    /// Its type.
    pub kind: GgmlType,
    /// Its bytes.
    /// A view into the file's one buffer when read (no copy), or its own bytes when built.
    pub data: bytes::Bytes,
}

/// A whole GGUF file in memory.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Gguf {
    /// Metadata, in file order.
    pub metadata: Vec<(String, Value)>,
    /// Tensors, in file order.
    pub tensors: Vec<TensorInfo>,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, message: impl Into<String>) -> ModelError {
        ModelError::Gguf {
            path: self.path.to_path_buf(),
            message: format!("{} (at byte {})", message.into(), self.pos),
        }
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| self.err(format!("truncated: {n} more bytes expected")))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N as u64)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        if len > MAX_STRING {
            return Err(self.err(format!("string of {len} bytes")));
        }
        let s = self.take(len)?;
        String::from_utf8(s.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }

    fn value(&mut self, kind: u32, depth: u32) -> Result<Value> {
        Ok(match kind {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array()?)),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.err(format!("bool byte {b}"))),
            },
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 0 {
                    return Err(self.err("nested arrays are not supported"));
                }
                let elem = self.u32()?;
                let count = self.u64()?;
                // Every element takes at least one byte: a count beyond what is left is a lie.
                if count > (self.bytes.len() - self.pos) as u64 {
                    return Err(self.err(format!("array of {count} elements")));
                }
                let mut v = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    v.push(self.value(elem, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(self.err(format!("metadata type {other}"))),
        })
    }
}

fn align(pos: u64, alignment: u64) -> u64 {
    pos.div_ceil(alignment) * alignment
}

impl Gguf {
    /// Reads a GGUF file (at most `max` bytes); the tensors are views into the one buffer read.
    pub fn read(path: &Path, max: u64) -> Result<Self> {
        let bytes = crate::io::read_bounded(path, max)?;
        Self::parse_owned(bytes, path)
    }

    /// Parses GGUF bytes (versions 2 and 3); `path` names them in errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        Self::parse_owned(bytes.to_vec(), path)
    }

    /// Parses a GGUF file held in `bytes`, keeping that buffer: every tensor's data is a view into
    /// it, so a file never takes twice its size in memory.
    pub fn parse_owned(bytes: Vec<u8>, path: &Path) -> Result<Self> {
        let buffer = bytes::Bytes::from(bytes);
        let bytes: &[u8] = &buffer;
        let mut c = Cursor {
            bytes,
            pos: 0,
            path,
        };
        if c.take(4)? != MAGIC {
            return Err(c.err("not a GGUF file (bad magic)"));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(c.err(format!("GGUF version {version} (2 and 3 are supported)")));
        }
        let tensors = c.u64()?;
        let kvs = c.u64()?;
        if tensors > MAX_ENTRIES || kvs > MAX_ENTRIES {
            return Err(c.err(format!("{tensors} tensors and {kvs} metadata entries")));
        }
        let mut metadata = Vec::with_capacity(kvs as usize);
        for _ in 0..kvs {
            let key = c.string()?;
            let kind = c.u32()?;
            let value = c.value(kind, 0)?;
            metadata.push((key, value));
        }
        let alignment = metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .unwrap_or(ALIGNMENT);
        if alignment == 0 || !alignment.is_power_of_two() || alignment > 1 << 20 {
            return Err(c.err(format!("alignment {alignment}")));
        }
        let mut infos = Vec::with_capacity(tensors as usize);
        for _ in 0..tensors {
            let name = c.string()?;
            let n_dims = c.u32()?;
            if n_dims == 0 || n_dims > 4 {
                return Err(c.err(format!("tensor {name}: {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = c.u64()?;
                if d == 0 || d > MAX_DIM {
                    return Err(c.err(format!("tensor {name}: dimension {d}")));
                }
                dims.push(d);
            }
            let kind =
                GgmlType::from_id(c.u32()?).map_err(|m| c.err(format!("tensor {name}: {m}")))?;
            let offset = c.u64()?;
            let n = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&n| n <= MAX_DIM)
                .ok_or_else(|| c.err(format!("tensor {name}: too many values")))?;
            let size = kind.bytes(n, dims[0]).ok_or_else(|| {
                c.err(format!(
                    "tensor {name}: rows of {} values do not form blocks",
                    dims[0]
                ))
            })?;
            infos.push((name, dims, kind, offset, size));
        }
        let data_start = align(c.pos as u64, alignment);
        let mut out = Vec::with_capacity(infos.len());
        for (name, dims, kind, offset, size) in infos {
            let start = data_start
                .checked_add(offset)
                .filter(|s| s.is_multiple_of(alignment))
                .ok_or_else(|| c.err(format!("tensor {name}: offset {offset}")))?;
            let end = start
                .checked_add(size)
                .filter(|&e| e <= bytes.len() as u64)
                .ok_or_else(|| {
                    c.err(format!(
                        "tensor {name}: data past the end of the file (truncated?)"
                    ))
                })?;
            out.push(TensorInfo {
                name,
                dims,
                kind,
                data: buffer.slice(start as usize..end as usize),
            });
        }
        Ok(Self {
            metadata,
            tensors: out,
        })
    }

    /// The file as bytes (version 3, tensors aligned to [`ALIGNMENT`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        fn string(out: &mut Vec<u8>, s: &str) {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        fn value(out: &mut Vec<u8>, v: &Value) {
            match v {
                Value::U8(x) => out.push(*x),
                Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
                Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
                Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
                Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
                Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
                Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
                Value::Bool(x) => out.push(u8::from(*x)),
                Value::Str(s) => string(out, s),
                Value::Array(items) => {
                    let elem = items.first().map_or(0, Value::type_id);
                    out.extend_from_slice(&elem.to_le_bytes());
                    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    for i in items {
                        value(out, i);
                    }
                }
                Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
                Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
                Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
            }
        }
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            string(&mut out, k);
            out.extend_from_slice(&v.type_id().to_le_bytes());
            value(&mut out, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            string(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.kind.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = align(offset + t.data.len() as u64, ALIGNMENT);
        }
        let start = align(out.len() as u64, ALIGNMENT) as usize;
        out.resize(start, 0);
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize(start + off as usize, 0);
            out.extend_from_slice(&t.data);
        }
        out
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The tensor called `name`, if the file has one.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// The GGUF name of `t`'s bias in `layer` (Qwen2's q/k/v biases).
fn gguf_bias(layer: usize, t: Target) -> String {
    gguf_proj(layer, t).replace(".weight", ".bias")
}

/// GGUF's name of a block projection.
fn gguf_proj(layer: usize, t: Target) -> String {
    let n = match t {
        Target::Q => "attn_q",
        Target::K => "attn_k",
        Target::V => "attn_v",
        Target::O => "attn_output",
        Target::Gate => "ffn_gate",
        Target::Up => "ffn_up",
        Target::Down => "ffn_down",
    };
    format!("blk.{layer}.{n}.weight")
}

/// Row `r` of GGUF's layout holds row `source(r)` of HF's (query/key rows of `heads` heads of `head_dim`):
/// HF keeps each head's rotary pairs in two halves, GGUF interleaves them.
fn hf_row_of_gguf(r: usize, head_dim: usize) -> usize {
    let (h, within) = (r / head_dim, r % head_dim);
    let (i, j) = (within / 2, within % 2);
    h * head_dim + j * (head_dim / 2) + i
}

/// `m` with its rows reordered: row `r` of the result is row `from(r)` of `m`.
fn permute_rows(m: &QMatrix, from: impl Fn(usize) -> usize) -> Result<QMatrix> {
    let bytes = m.to_bytes();
    let row = bytes.len() / m.rows().max(1);
    let mut out = Vec::with_capacity(bytes.len());
    for r in 0..m.rows() {
        let s = from(r);
        out.extend_from_slice(&bytes[s * row..(s + 1) * row]);
    }
    QMatrix::from_bytes(m.rows(), m.cols(), m.kind(), &out)
}

fn matrix_tensor(name: String, m: &QMatrix) -> TensorInfo {
    TensorInfo {
        name,
        dims: vec![m.cols() as u64, m.rows() as u64],
        kind: match m.kind() {
            QuantType::F32 => GgmlType::F32,
            QuantType::Q8_0 => GgmlType::Q8_0,
            QuantType::Q4_0 => GgmlType::Q4_0,
            QuantType::Q4_1 => GgmlType::Q4_1,
        },
        data: m.to_bytes().into(),
    }
}

fn vector_tensor(name: String, v: &[f32]) -> TensorInfo {
    TensorInfo {
        name,
        dims: vec![v.len() as u64],
        kind: GgmlType::F32,
        data: v
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect::<Vec<u8>>()
            .into(),
    }
}

/// The GGUF of `model` (weights in their stored format) with the vocabulary of `tokenizer`
/// ([`vocab_metadata`]): architecture `llama`, or `qwen2` when the projections carry biases (whose
/// query and key rows stay in HF order: llama.cpp runs Qwen2's RoPE on halves, as HF does).
pub fn export(model: &Llama, tokenizer: &Tokenizer) -> Result<Gguf> {
    let c = &model.config;
    let arch = if c.qkv_bias { "qwen2" } else { "llama" };
    let u32v = |x: usize| Value::U32(x as u32);
    let vocab = vocab_metadata(tokenizer, c)?;
    let file_type = match model.quant {
        QuantType::F32 => 0,
        QuantType::Q4_0 => 2,
        QuantType::Q4_1 => 3,
        QuantType::Q8_0 => 7,
    };
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::Str(arch.into())),
        ("general.name".into(), Value::Str("starling".into())),
        ("general.alignment".into(), Value::U32(ALIGNMENT as u32)),
        ("general.file_type".into(), Value::U32(file_type)),
        (
            "llama.context_length".into(),
            u32v(c.max_position_embeddings),
        ),
        ("llama.embedding_length".into(), u32v(c.hidden_size)),
        ("llama.block_count".into(), u32v(c.num_hidden_layers)),
        (
            "llama.feed_forward_length".into(),
            u32v(c.intermediate_size),
        ),
        (
            "llama.attention.head_count".into(),
            u32v(c.num_attention_heads),
        ),
        (
            "llama.attention.head_count_kv".into(),
            u32v(c.num_key_value_heads),
        ),
        ("llama.attention.key_length".into(), u32v(c.head_dim)),
        ("llama.attention.value_length".into(), u32v(c.head_dim)),
        ("llama.rope.dimension_count".into(), u32v(c.head_dim)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(c.rms_norm_eps as f32),
        ),
        (
            "llama.rope.freq_base".into(),
            Value::F32(c.rope_theta as f32),
        ),
        ("llama.vocab_size".into(), u32v(c.vocab_size)),
    ];
    // The architecture's keys are named after it.
    let mut metadata: Vec<(String, Value)> = metadata
        .into_iter()
        .map(|(k, v)| match k.strip_prefix("llama.") {
            Some(rest) => (format!("{arch}.{rest}"), v),
            None => (k, v),
        })
        .collect();
    metadata.extend(vocab);
    let mut tensors = vec![matrix_tensor("token_embd.weight".into(), &model.embed)];
    for (i, b) in model.blocks.iter().enumerate() {
        tensors.push(vector_tensor(
            format!("blk.{i}.attn_norm.weight"),
            &b.attn_norm,
        ));
        for t in Target::ALL {
            let m = &b.proj[t as usize].0;
            let m = match t {
                Target::Q | Target::K if !c.qkv_bias => {
                    permute_rows(m, |r| hf_row_of_gguf(r, c.head_dim))?
                }
                _ => (**m).clone(),
            };
            tensors.push(matrix_tensor(gguf_proj(i, t), &m));
            if let Some(bias) = b.bias(t) {
                tensors.push(vector_tensor(gguf_bias(i, t), bias));
            }
        }
        tensors.push(vector_tensor(
            format!("blk.{i}.ffn_norm.weight"),
            &b.mlp_norm,
        ));
    }
    tensors.push(vector_tensor("output_norm.weight".into(), &model.norm));
    if !c.tie_word_embeddings {
        tensors.push(matrix_tensor("output.weight".into(), &model.lm_head.0));
    }
    Ok(Gguf { metadata, tensors })
}

/// The split Qwen2's tokenizer makes before its byte-level step (llama.cpp's `qwen2` pre-tokenizer):
/// contractions, letters with one leading non-letter, single digits, punctuation runs, newlines.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's pre-tokenizer as tokenizer.json writes it.
fn qwen2_pre_tokenizer() -> serde_json::Value {
    serde_json::json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]})
}

/// llama.cpp's token types.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_UNUSED: i32 = 5;
const TOKEN_BYTE: i32 = 6;

/// The GGUF vocabulary (`tokenizer.ggml.*`) of `tokenizer` for a model of `c.vocab_size` ids.
///
/// - The byte-level tokenizer becomes a SentencePiece-style (`llama`) vocabulary of byte tokens
///   (`<0x41>`…, so llama.cpp tokenizes with byte fallback), then `<s>`, `</s>`, `<pad>`.
/// - A HuggingFace byte-level BPE tokenizer (GPT-2 style: `ByteLevel` pre-tokenizer, alone, after
///   single-digit splitting as SmolLM's, or after Qwen2's regex split) becomes a `gpt2` vocabulary
///   with its merges and llama.cpp's matching pre-tokenizer (`gpt-2`, `smollm`, `qwen2`); its special added tokens are control tokens.
/// - Ids the model has beyond the tokenizer's are written as unused tokens.
///
/// Anything else (WordPiece, Unigram, normalizers) is refused: llama.cpp would tokenize it
/// differently.
pub fn vocab_metadata(tokenizer: &Tokenizer, c: &LlamaConfig) -> Result<Vec<(String, Value)>> {
    let refuse = |m: String| ModelError::InvalidArgument(format!("GGUF vocabulary: {m}"));
    let mut out: Vec<(String, Value)> = Vec::new();
    let (mut tokens, mut types): (Vec<String>, Vec<i32>) = match tokenizer {
        Tokenizer::Byte => {
            let mut t: Vec<String> = (0..256).map(|b| format!("<0x{b:02X}>")).collect();
            t.extend(["<s>", "</s>", "<pad>"].map(String::from));
            let mut k = vec![TOKEN_BYTE; 256];
            k.extend([TOKEN_CONTROL; 3]);
            out.push(("tokenizer.ggml.model".into(), Value::Str("llama".into())));
            out.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(BYTE_BOS)));
            out.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(BYTE_EOS)));
            out.push((
                "tokenizer.ggml.padding_token_id".into(),
                Value::U32(BYTE_PAD),
            ));
            (t, k)
        }
        Tokenizer::Hf(_) => {
            let text = tokenizer
                .to_json()
                .ok_or_else(|| refuse("the tokenizer cannot be serialised".into()))?;
            let j: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| refuse(format!("tokenizer JSON: {e}")))?;
            let model = &j["model"];
            if model["type"] != "BPE" || model["byte_fallback"] == true {
                return Err(refuse(format!(
                    "only byte-level BPE tokenizers are exported (this one is {})",
                    model["type"]
                )));
            }
            let pre = &j["pre_tokenizer"];
            let qwen2 = pre["type"] == "Sequence"
                && pre["pretokenizers"].as_array().is_some_and(|v| {
                    v.len() == 2
                        && v[0]["type"] == "Split"
                        && v[0]["pattern"]["Regex"] == QWEN2_SPLIT
                        && v[0]["behavior"] == "Isolated"
                        && v[0]["invert"] != true
                        && v[1]["type"] == "ByteLevel"
                        && v[1]["use_regex"] == false
                });
            // Qwen2's NFC normalizer is what llama.cpp's converter drops too (it does not normalize).
            let nfc_of_qwen2 = qwen2 && j["normalizer"]["type"] == "NFC";
            if !(j["normalizer"].is_null() || nfc_of_qwen2) {
                return Err(refuse(
                    "tokenizers with a normalizer are not exported".into(),
                ));
            }
            let byte_level =
                |p: &serde_json::Value| p["type"] == "ByteLevel" && p["use_regex"] != false;
            let pre_name = if byte_level(pre) {
                "gpt-2"
            } else if qwen2 {
                "qwen2"
            } else if pre["type"] == "Sequence"
                && pre["pretokenizers"].as_array().is_some_and(|v| {
                    v.len() == 2
                        && v[0]["type"] == "Digits"
                        && v[0]["individual_digits"] == true
                        && byte_level(&v[1])
                })
            {
                "smollm"
            } else {
                return Err(refuse(format!(
                    "pre-tokenizer {pre} has no llama.cpp equivalent Starling knows"
                )));
            };
            let mut by_id: Vec<Option<(String, i32)>> = Vec::new();
            let mut put = |id: u64, tok: &str, kind: i32| -> Result<()> {
                let id = usize::try_from(id)
                    .ok()
                    .filter(|&i| i < c.vocab_size)
                    .ok_or_else(|| {
                        refuse(format!("token id {id} outside the model's vocabulary"))
                    })?;
                if by_id.len() <= id {
                    by_id.resize(id + 1, None);
                }
                by_id[id] = Some((tok.to_string(), kind));
                Ok(())
            };
            for (tok, id) in model["vocab"]
                .as_object()
                .ok_or_else(|| refuse("no BPE vocabulary".into()))?
            {
                put(id.as_u64().unwrap_or(u64::MAX), tok, TOKEN_NORMAL)?;
            }
            for a in j["added_tokens"].as_array().into_iter().flatten() {
                let kind = if a["special"] == true {
                    TOKEN_CONTROL
                } else {
                    TOKEN_NORMAL
                };
                put(
                    a["id"].as_u64().unwrap_or(u64::MAX),
                    a["content"].as_str().unwrap_or_default(),
                    kind,
                )?;
            }
            let mut t = Vec::with_capacity(by_id.len());
            let mut k = Vec::with_capacity(by_id.len());
            for (i, slot) in by_id.into_iter().enumerate() {
                let (tok, kind) = slot.unwrap_or_else(|| (format!("[UNUSED{i}]"), TOKEN_UNUSED));
                t.push(tok);
                k.push(kind);
            }
            let merges: Vec<Value> = model["merges"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| match m {
                    serde_json::Value::Array(p) => Value::Str(format!(
                        "{} {}",
                        p.first().and_then(|x| x.as_str()).unwrap_or_default(),
                        p.get(1).and_then(|x| x.as_str()).unwrap_or_default()
                    )),
                    other => Value::Str(other.as_str().unwrap_or_default().to_string()),
                })
                .collect();
            out.push(("tokenizer.ggml.model".into(), Value::Str("gpt2".into())));
            out.push(("tokenizer.ggml.pre".into(), Value::Str(pre_name.into())));
            out.push(("tokenizer.ggml.merges".into(), Value::Array(merges)));
            if let Some(b) = c.bos_token_id {
                out.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
            }
            if let Some(&e) = c.eos_token_ids.first() {
                out.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
            }
            (t, k)
        }
    };
    if tokens.len() > c.vocab_size {
        return Err(refuse(format!(
            "{} tokens but the model has {} ids",
            tokens.len(),
            c.vocab_size
        )));
    }
    for i in tokens.len()..c.vocab_size {
        tokens.push(format!("<unused{i}>"));
        types.push(TOKEN_UNUSED);
    }
    out.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)));
    out.push((
        "tokenizer.ggml.scores".into(),
        Value::Array(vec![Value::F32(0.0); tokens.len()]),
    ));
    out.push((
        "tokenizer.ggml.token_type".into(),
        Value::Array(types.into_iter().map(Value::I32).collect()),
    ));
    out.push((
        "tokenizer.ggml.tokens".into(),
        Value::Array(tokens.into_iter().map(Value::Str).collect()),
    ));
    Ok(out)
}

/// The tokenizer a GGUF file's vocabulary describes: `None` for Starling's byte-level one (a
/// `llama` vocabulary of 256 byte tokens, then `<s>`, `</s>`, `<pad>`, then unused ids), or the
/// The file's chat template (`tokenizer.chat_template`), with the texts of its BOS and EOS tokens from
/// its vocabulary, if it has one; a template that does not parse is an error.
pub fn chat_template(g: &Gguf) -> Result<Option<crate::chat::ChatTemplate>> {
    let Some(Value::Str(source)) = g.get("tokenizer.chat_template") else {
        return Ok(None);
    };
    let token = |key: &str| -> String {
        let id = g.get(key).and_then(Value::as_u64);
        match (id, g.get("tokenizer.ggml.tokens")) {
            (Some(id), Some(Value::Array(tokens))) => match tokens.get(id as usize) {
                Some(Value::Str(t)) => t.clone(),
                _ => String::new(),
            },
            _ => String::new(),
        }
    };
    crate::chat::ChatTemplate::new(
        source,
        &token("tokenizer.ggml.bos_token_id"),
        &token("tokenizer.ggml.eos_token_id"),
    )
    .map(Some)
}

/// `tokenizer.json` text of a `gpt2` (byte-level BPE) vocabulary with the `gpt-2`, `smollm` or
/// `qwen2` pre-tokenizer. Other vocabularies are a typed error.
pub fn tokenizer_json(g: &Gguf, path: &Path) -> Result<Option<String>> {
    let bad = |m: String| ModelError::Gguf {
        path: PathBuf::from(path),
        message: m,
    };
    let strings = |key: &str| -> Result<Vec<&str>> {
        match g.get(key) {
            Some(Value::Array(v)) => v
                .iter()
                .map(|x| match x {
                    Value::Str(s) => Ok(s.as_str()),
                    _ => Err(bad(format!("{key} holds a non-string"))),
                })
                .collect(),
            _ => Err(bad(format!("no {key}"))),
        }
    };
    let model = match g.get("tokenizer.ggml.model") {
        Some(Value::Str(s)) => s.as_str(),
        _ => return Err(bad("no tokenizer.ggml.model".into())),
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
        Some(Value::Array(v)) => v
            .iter()
            .map(|x| x.as_u64().map_or(0, |t| t as i64))
            .collect(),
        _ => vec![TOKEN_NORMAL as i64; tokens.len()],
    };
    match model {
        "llama" => {
            let byte_level = tokens.len() >= BYTE_VOCAB
                && (0..256).all(|b| tokens[b] == format!("<0x{b:02X}>"))
                && tokens[256..BYTE_VOCAB] == ["<s>", "</s>", "<pad>"];
            if byte_level {
                Ok(None)
            } else {
                Err(bad(
                    "SentencePiece vocabularies other than Starling's byte-level one are not supported"
                        .into(),
                ))
            }
        }
        "gpt2" => {
            let merges = strings("tokenizer.ggml.merges")?;
            let pre = match g.get("tokenizer.ggml.pre") {
                Some(Value::Str(s)) => s.as_str(),
                _ => "default",
            };
            let byte_level = serde_json::json!({
                "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
            });
            let pre_tokenizer = match pre {
                "gpt-2" => byte_level,
                "smollm" => serde_json::json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, byte_level]}),
                "qwen2" => qwen2_pre_tokenizer(),
                other => {
                    return Err(bad(format!(
                        "pre-tokenizer {other:?} is not supported (gpt-2, smollm and qwen2 are)"
                    )))
                }
            };
            let mut vocab = serde_json::Map::new();
            let mut added = Vec::new();
            for (id, tok) in tokens.iter().enumerate() {
                let kind = types.get(id).copied().unwrap_or(TOKEN_NORMAL as i64);
                if kind == TOKEN_UNUSED as i64 {
                    continue;
                }
                if vocab
                    .insert(tok.to_string(), serde_json::json!(id))
                    .is_some()
                {
                    return Err(bad(format!("token {tok:?} appears twice")));
                }
                if kind == TOKEN_CONTROL as i64 {
                    added.push(
                        serde_json::json!({"id": id, "content": tok, "single_word": false,
                        "lstrip": false, "rstrip": false, "normalized": false, "special": true}),
                    );
                }
            }
            let j = serde_json::json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": null, "pre_tokenizer": pre_tokenizer, "post_processor": null,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null,
                    "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                    "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
            });
            let text = j.to_string();
            // The tokenizers library must accept what we hand the user.
            Tokenizer::from_json(text.as_bytes(), path)?;
            Ok(Some(text))
        }
        other => Err(bad(format!("tokenizer model {other:?} is not supported"))),
    }
}

/// Loads a `llama` or `qwen2` architecture GGUF as a [`Llama`]: tensors in a format Starling runs natively (Q8_0,
/// Q4_0, Q4_1) keep their blocks when `quant` is `None` or their own type; the others are decoded and
/// stored as `quant` (with `None`: Q8_0 for the types that are quantized in the file, f32 for
/// F32/F16/BF16).
pub fn import(g: &Gguf, path: &Path, quant: Option<QuantType>, device: &Device) -> Result<Llama> {
    let bad = |m: String| ModelError::Gguf {
        path: PathBuf::from(path),
        message: m,
    };
    let arch = match g.get("general.architecture") {
        Some(Value::Str(s)) => s.clone(),
        _ => return Err(bad("no general.architecture".into())),
    };
    if arch != "llama" && arch != "qwen2" {
        return Err(bad(format!(
            "architecture {arch:?} (llama and qwen2 are supported)"
        )));
    }
    let qwen2 = arch == "qwen2";
    let num = |k: &str| -> Result<u64> {
        g.get(&format!("{arch}.{k}"))
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(format!("missing {arch}.{k}")))
    };
    let float = |k: &str, default: f64| {
        g.get(&format!("{arch}.{k}"))
            .and_then(Value::as_f64)
            .unwrap_or(default)
    };
    // What this crate cannot compute is refused, never ignored.
    if let Some(Value::Str(t)) = g.get(&format!("{arch}.rope.scaling.type")) {
        if t != "none" {
            return Err(bad(format!("rope scaling {t:?} is not supported")));
        }
    }
    if g.get(&format!("{arch}.attention.sliding_window")).is_some() && !qwen2 {
        return Err(bad("sliding-window attention is not supported".into()));
    }
    let embd = g
        .tensor("token_embd.weight")
        .ok_or_else(|| bad("no token_embd.weight".into()))?;
    let hidden = num("embedding_length")? as usize;
    let heads = num("attention.head_count")? as usize;
    let kv_heads = num("attention.head_count_kv").unwrap_or(heads as u64) as usize;
    let vocab = embd.dims.get(1).copied().unwrap_or(0) as usize;
    let head_dim = num("attention.key_length").map_or(hidden / heads.max(1), |v| v as usize);
    let config = LlamaConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: num("feed_forward_length")? as usize,
        num_hidden_layers: num("block_count")? as usize,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: float("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta: float("rope.freq_base", 10_000.0),
        tie_word_embeddings: g.tensor("output.weight").is_none(),
        max_position_embeddings: num("context_length")? as usize,
        bos_token_id: g
            .get("tokenizer.ggml.bos_token_id")
            .and_then(Value::as_u64)
            .map(|v| v as u32),
        eos_token_ids: g
            .get("tokenizer.ggml.eos_token_id")
            .and_then(Value::as_u64)
            .map(|v| vec![v as u32])
            .unwrap_or_default(),
        qkv_bias: qwen2,
    };
    config
        .validate()
        .map_err(|m| bad(format!("inconsistent model: {m}")))?;
    let target = quant.unwrap_or(QuantType::F32);
    let matrix = |name: &str, rows: usize, cols: usize| -> Result<QMatrix> {
        let t = g
            .tensor(name)
            .ok_or_else(|| bad(format!("no tensor {name}")))?;
        if t.dims != [cols as u64, rows as u64] {
            return Err(bad(format!(
                "{name}: dimensions {:?}, expected [{cols}, {rows}]",
                t.dims
            )));
        }
        let stored = native(t.kind);
        match stored {
            Some(k) => {
                let m = QMatrix::from_bytes(rows, cols, k, &t.data)
                    .map_err(|e| bad(format!("{name}: {e}")))?;
                match quant {
                    Some(q) if q != k => {
                        QMatrix::quantize(rows, cols, &m.to_f32(), q.for_row_len(cols))
                    }
                    _ => Ok(m),
                }
            }
            None => {
                let values = floats(t);
                // Without a requested format, a block-quantized tensor of a type that does not
                // run natively (K-quants, Q5_*) becomes Q8_0, the closest one that does.
                let target = match (quant, t.kind.block()) {
                    (None, Some(_)) => QuantType::Q8_0,
                    _ => target,
                };
                QMatrix::quantize(rows, cols, &values, target.for_row_len(cols))
            }
        }
    };
    let vector = |name: &str, len: usize| -> Result<Vec<f32>> {
        let t = g
            .tensor(name)
            .ok_or_else(|| bad(format!("no tensor {name}")))?;
        if t.dims != [len as u64] || t.kind.block().is_some() {
            return Err(bad(format!("{name}: expected {len} f32/f16 values")));
        }
        Ok(floats(t))
    };
    let c = &config;
    let embed = Arc::new(matrix("token_embd.weight", c.vocab_size, c.hidden_size)?);
    let mut blocks = Vec::with_capacity(c.num_hidden_layers);
    for i in 0..c.num_hidden_layers {
        let mut proj = Vec::with_capacity(7);
        for t in Target::ALL {
            let (fan_in, fan_out) = t.shape(c);
            let m = matrix(&gguf_proj(i, t), fan_out, fan_in)?;
            let m = match t {
                Target::Q | Target::K if !qwen2 => {
                    // The inverse of the export permutation.
                    let mut inverse = vec![0usize; m.rows()];
                    for (r, slot) in (0..m.rows()).map(|r| (r, hf_row_of_gguf(r, c.head_dim))) {
                        inverse[slot] = r;
                    }
                    permute_rows(&m, |r| inverse[r])?
                }
                _ => m,
            };
            proj.push(Frozen(Arc::new(m)));
        }
        let proj: [Frozen; 7] = proj
            .try_into()
            .map_err(|_| bad("seven projections expected".into()))?;
        let qkv_bias = if qwen2 {
            let bias = |t: Target| vector(&gguf_bias(i, t), t.shape(c).1);
            Some([bias(Target::Q)?, bias(Target::K)?, bias(Target::V)?])
        } else {
            None
        };
        blocks.push(Block {
            attn_norm: vector(&format!("blk.{i}.attn_norm.weight"), c.hidden_size)?,
            proj,
            mlp_norm: vector(&format!("blk.{i}.ffn_norm.weight"), c.hidden_size)?,
            qkv_bias,
        });
    }
    let norm = vector("output_norm.weight", c.hidden_size)?;
    let lm_head = if c.tie_word_embeddings {
        Frozen(embed.clone())
    } else {
        Frozen(Arc::new(matrix(
            "output.weight",
            c.vocab_size,
            c.hidden_size,
        )?))
    };
    let kind = crate::checkpoint::main_kind(
        std::iter::once(embed.kind()).chain(
            blocks
                .iter()
                .flat_map(|b| b.proj.iter().map(|p| p.0.kind())),
        ),
    );
    Ok(Llama {
        config,
        quant: kind,
        embed,
        blocks,
        norm,
        lm_head,
        device: device.clone(),
    })
}

/// The Starling storage of a GGUF tensor type that Starling runs without converting it.
fn native(kind: GgmlType) -> Option<QuantType> {
    match kind {
        GgmlType::Q8_0 => Some(QuantType::Q8_0),
        GgmlType::Q4_0 => Some(QuantType::Q4_0),
        GgmlType::Q4_1 => Some(QuantType::Q4_1),
        _ => None,
    }
}

/// A tensor's values as f32 (block formats dequantized as llama.cpp's reference does).
fn floats(t: &TensorInfo) -> Vec<f32> {
    dequantize(t.kind, &t.data)
}

/// The values of `data`, a whole number of `kind`'s blocks (a partial block at the end is ignored; the
/// directory's sizes were checked when the file was read), decoded as ggml's `dequantize_row_*` does.
pub fn dequantize(kind: GgmlType, data: &[u8]) -> Vec<f32> {
    let h = |b: &[u8], at: usize| half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
    let blocks = |bytes: usize, values: usize, f: &dyn Fn(&[u8], &mut [f32])| -> Vec<f32> {
        let mut out = vec![0.0f32; data.len() / bytes * values];
        for (b, y) in data.chunks_exact(bytes).zip(out.chunks_exact_mut(values)) {
            f(b, y);
        }
        out
    };
    match kind {
        GgmlType::Q4_0 | GgmlType::Q8_0 | GgmlType::Q4_1 => {
            let Some(kind) = native(kind) else {
                return Vec::new();
            };
            let n = data.len() / kind.block_bytes() * 32;
            QMatrix::from_bytes(1, n, kind, &data[..n / 32 * kind.block_bytes()])
                .map(|m| m.to_f32())
                .unwrap_or_default()
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            // Q5_1 adds an f16 minimum after the scale; Q5_0 centres on 16 instead.
            let with_min = kind == GgmlType::Q5_1;
            let bytes = if with_min { 24 } else { 22 };
            blocks(bytes, 32, &|b, y| {
                let d = h(b, 0);
                let at = if with_min { 4 } else { 2 };
                let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
                let qs = &b[at + 4..at + 20];
                for j in 0..16 {
                    let h0 = (((qh >> j) << 4) & 0x10) as u8;
                    let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                    let (x0, x1) = ((qs[j] & 0x0f) | h0, (qs[j] >> 4) | h1);
                    if with_min {
                        let m = h(b, 2);
                        y[j] = x0 as f32 * d + m;
                        y[j + 16] = x1 as f32 * d + m;
                    } else {
                        y[j] = (x0 as i32 - 16) as f32 * d;
                        y[j + 16] = (x1 as i32 - 16) as f32 * d;
                    }
                }
            })
        }
        GgmlType::Q2K => blocks(84, 256, &|b, y| {
            let (sc, qs) = (&b[..16], &b[16..80]);
            let (d, dmin) = (h(b, 80), h(b, 82));
            // Sixteen groups of 16 values, each with its own 4-bit scale and minimum.
            for (is, out) in y.chunks_exact_mut(16).enumerate() {
                let (n, shift, half) = (is / 8, 2 * ((is / 2) % 4), is % 2);
                let q = &qs[32 * n + 16 * half..];
                let s = sc[is];
                let (dl, ml) = (d * (s & 0x0f) as f32, dmin * (s >> 4) as f32);
                for (l, v) in out.iter_mut().enumerate() {
                    *v = dl * ((q[l] >> shift) & 3) as f32 - ml;
                }
            }
        }),
        GgmlType::Q3K => blocks(110, 256, &|b, y| {
            let (hm, qs) = (&b[..32], &b[32..96]);
            let d = h(b, 108);
            let scales = q3k_scales(&b[96..108]);
            // Sixteen groups of 16 values; the high bit of group pair p is bit p of the mask bytes.
            for (is, out) in y.chunks_exact_mut(16).enumerate() {
                let (n, shift, half) = (is / 8, 2 * ((is / 2) % 4), is % 2);
                let m = 1u8 << (is / 2);
                let q = &qs[32 * n..];
                let dl = d * (scales[is] as i32 - 32) as f32;
                for (l, v) in out.iter_mut().enumerate() {
                    let i = l + 16 * half;
                    let low = ((q[i] >> shift) & 3) as i32;
                    let high = if hm[i] & m != 0 { 0 } else { 4 };
                    *v = dl * (low - high) as f32;
                }
            }
        }),
        // Q5_K is Q4_K with a fifth bit per value in 32 bytes before the low nibbles.
        GgmlType::Q4K => blocks(144, 256, &|b, out| k_quant(b, out, None, &b[16..144])),
        GgmlType::Q5K => blocks(176, 256, &|b, out| {
            k_quant(b, out, Some(&b[16..48]), &b[48..176])
        }),
        GgmlType::Q6K => blocks(210, 256, &|b, out| {
            let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
            let d = h(b, 208);
            for n in 0..2 {
                let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                let y = &mut out[128 * n..];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
            }
        }),
        GgmlType::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        GgmlType::BF16 => data
            .chunks_exact(2)
            .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
            .collect(),
        GgmlType::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    }
}

/// One Q4_K or Q5_K super-block: eight groups of 32 with 6-bit scales and minimums (after the f16 scale
/// and minimum at the start of `b`), low nibbles in `ql`, and for Q5_K a fifth bit per value in `qh`.
fn k_quant(b: &[u8], out: &mut [f32], qh: Option<&[u8]>, mut ql: &[u8]) {
    let h = |at: usize| half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
    let (d, dmin) = (h(0), h(2));
    let scales = &b[4..16];
    let (mut u1, mut u2) = (1u8, 2u8);
    let high = |l: usize, u: u8| qh.map_or(0, |qh| if qh[l] & u != 0 { 16 } else { 0 });
    let mut y = 0;
    for is in (0..8).step_by(2) {
        let (s1, m1) = scale_min_k4(is, scales);
        let (s2, m2) = scale_min_k4(is + 1, scales);
        let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
        for l in 0..32 {
            out[y + l] = d1 * ((ql[l] & 0x0f) + high(l, u1)) as f32 - m1;
            out[y + 32 + l] = d2 * ((ql[l] >> 4) + high(l, u2)) as f32 - m2;
        }
        y += 64;
        ql = &ql[32..];
        u1 <<= 2;
        u2 <<= 2;
    }
}

/// The sixteen 6-bit scales of a Q3_K super-block (stored offset by 32), unpacked from 12 bytes as
/// ggml does: the low four bits of each from the first eight bytes, the high two from the last four.
fn q3k_scales(packed: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, s) in out.iter_mut().enumerate() {
        let low = if i < 8 {
            packed[i] & 0x0f
        } else {
            packed[i - 8] >> 4
        };
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        *s = low | (high << 4);
    }
    out
}

/// Scale and min `j` (0..8) of a Q4_K super-block, 6 bits each, packed in 12 bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Backend;

    fn tiny(quant: QuantType) -> Llama {
        let cfg = LlamaConfig {
            vocab_size: 259,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: true,
            max_position_embeddings: 128,
            bos_token_id: Some(256),
            eos_token_ids: vec![257],
            qkv_bias: false,
        };
        Llama::random(cfg, quant, &Backend::default().device(), 7).unwrap()
    }

    #[test]
    fn quantized_round_trips_are_bit_exact_and_logits_match() {
        let path = Path::new("mem.gguf");
        for q in [
            QuantType::Q8_0,
            QuantType::Q4_0,
            QuantType::Q4_1,
            QuantType::F32,
        ] {
            let m = tiny(q);
            let bytes = export(&m, &Tokenizer::Byte).unwrap().to_bytes();
            let g = Gguf::parse(&bytes, path).unwrap();
            assert_eq!(g.to_bytes(), bytes, "writer and reader agree");
            let back = import(&g, path, None, &m.device).unwrap();
            assert_eq!(back.config, m.config);
            assert_eq!(back.quant, q);
            assert_eq!(back.embed.to_bytes(), m.embed.to_bytes());
            for (a, b) in back.blocks.iter().zip(&m.blocks) {
                for t in 0..7 {
                    assert_eq!(
                        a.proj[t].0.to_bytes(),
                        b.proj[t].0.to_bytes(),
                        "{q:?} proj {t}"
                    );
                }
                assert_eq!(a.attn_norm, b.attn_norm);
            }
            let ids = [1u32, 2, 3, 4, 5, 6];
            let l1: Vec<f32> = m
                .forward(&ids, 1, None, None, None)
                .unwrap()
                .into_data()
                .iter::<f32>()
                .collect();
            let l2: Vec<f32> = back
                .forward(&ids, 1, None, None, None)
                .unwrap()
                .into_data()
                .iter::<f32>()
                .collect();
            assert_eq!(l1, l2);
            // And again: import → export → import is a fixed point.
            assert_eq!(export(&back, &Tokenizer::Byte).unwrap().to_bytes(), bytes);
        }
    }

    /// A model of `vocab` ids with the tiny shapes.
    fn with_vocab(vocab: usize) -> Llama {
        let mut cfg = tiny(QuantType::F32).config;
        cfg.vocab_size = vocab;
        cfg.bos_token_id = Some(0);
        cfg.eos_token_ids = vec![1];
        Llama::random(cfg, QuantType::Q8_0, &Backend::Flex.device(), 4).unwrap()
    }

    #[test]
    fn byte_level_bpe_vocabularies_cross_gguf_and_tokenize_alike() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tokenizer");
        let original = std::fs::read_to_string(dir.join("tokenizer.json")).unwrap();
        let texts = [
            "To be, or not to be: that is the question.",
            "naïve café — ünïcödé ✓ 1234 and 56",
            "  Ophelia!\n\tNymph </s> in thy orisons",
        ];
        // GPT-2 style (ByteLevel alone) and SmolLM style (single digits split first).
        let mut smollm: serde_json::Value = serde_json::from_str(&original).unwrap();
        smollm["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, smollm["pre_tokenizer"].clone()]});
        // Qwen2 style: its regex split, then bytes (and the NFC normalizer its files carry).
        let mut qwen2: serde_json::Value = serde_json::from_str(&original).unwrap();
        qwen2["pre_tokenizer"] = qwen2_pre_tokenizer();
        qwen2["normalizer"] = serde_json::json!({"type": "NFC"});
        for (json, pre) in [
            (original.clone(), "gpt-2"),
            (smollm.to_string(), "smollm"),
            (qwen2.to_string(), "qwen2"),
        ] {
            let tok = Tokenizer::from_json(json.as_bytes(), Path::new("t.json")).unwrap();
            let model = with_vocab(420); // more ids than the tokenizer's 400: unused ids
            let bytes = export(&model, &tok).unwrap().to_bytes();
            let g = Gguf::parse(&bytes, Path::new("m.gguf")).unwrap();
            assert_eq!(g.get("tokenizer.ggml.pre"), Some(&Value::Str(pre.into())));
            let back = tokenizer_json(&g, Path::new("m.gguf")).unwrap().unwrap();
            let back = Tokenizer::from_json(back.as_bytes(), Path::new("back.json")).unwrap();
            for text in texts {
                let ids = tok.encode(text).unwrap();
                assert_eq!(back.encode(text).unwrap(), ids, "{pre}: {text}");
                assert_eq!(back.decode(&ids), tok.decode(&ids));
            }
            assert_eq!(back.token_id("</s>"), Some(1));
            // The weights and the vocabulary come back together.
            let m = import(&g, Path::new("m.gguf"), None, &Backend::Flex.device()).unwrap();
            assert_eq!(m.config.vocab_size, 420);
        }
        // The byte-level vocabulary reads back as "no tokenizer.json".
        let g = export(&with_vocab(300), &Tokenizer::Byte).unwrap();
        assert_eq!(tokenizer_json(&g, Path::new("b.gguf")).unwrap(), None);
    }

    #[test]
    fn vocabularies_llama_cpp_would_read_otherwise_are_refused() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tokenizer");
        let original: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
                .unwrap();
        let model = with_vocab(420);
        let mut normalized = original.clone();
        normalized["normalizer"] = serde_json::json!({"type": "Lowercase"});
        let mut whitespace = original.clone();
        whitespace["pre_tokenizer"] = serde_json::json!({"type": "Whitespace"});
        for bad in [normalized, whitespace] {
            let tok = Tokenizer::from_json(bad.to_string().as_bytes(), Path::new("t")).unwrap();
            assert!(matches!(
                export(&model, &tok),
                Err(ModelError::InvalidArgument(_))
            ));
        }
        // A tokenizer with more ids than the model.
        let tok = Tokenizer::from_json(original.to_string().as_bytes(), Path::new("t")).unwrap();
        assert!(export(&with_vocab(300), &tok).is_err());
        // A SentencePiece vocabulary that is not the byte-level one, an unknown pre-tokenizer.
        let mut g = export(&model, &Tokenizer::Byte).unwrap();
        for (k, v) in g.metadata.iter_mut() {
            if k == "tokenizer.ggml.tokens" {
                if let Value::Array(t) = v {
                    t[65] = Value::Str("A".into());
                }
            }
        }
        assert!(matches!(
            tokenizer_json(&g, Path::new("x.gguf")),
            Err(ModelError::Gguf { .. })
        ));
        let mut g = export(&model, &tok).unwrap();
        for (k, v) in g.metadata.iter_mut() {
            if k == "tokenizer.ggml.pre" {
                *v = Value::Str("deepseek-llm".into());
            }
        }
        assert!(matches!(
            tokenizer_json(&g, Path::new("x.gguf")),
            Err(ModelError::Gguf { .. })
        ));
    }

    #[test]
    fn query_rows_are_interleaved_as_llama_cpp_expects() {
        // head_dim 4: HF rows [a0 a1 | b0 b1] become GGUF rows [a0 b0 a1 b1].
        let order: Vec<usize> = (0..8).map(|r| hf_row_of_gguf(r, 4)).collect();
        assert_eq!(order, [0, 2, 1, 3, 4, 6, 5, 7]);
    }

    #[test]
    fn malformed_and_truncated_files_are_typed_errors() {
        let path = Path::new("bad.gguf");
        let bytes = export(&tiny(QuantType::Q8_0), &Tokenizer::Byte)
            .unwrap()
            .to_bytes();
        for cut in [0, 3, 4, 8, 20, 100, bytes.len() / 2, bytes.len() - 1] {
            let e = Gguf::parse(&bytes[..cut], path).unwrap_err();
            assert!(matches!(e, ModelError::Gguf { .. }), "cut {cut}: {e}");
        }
        let mut wrong = bytes.clone();
        wrong[0] = b'X';
        assert!(Gguf::parse(&wrong, path)
            .unwrap_err()
            .to_string()
            .contains("magic"));
        // A huge tensor count is refused before anything is allocated for it.
        let mut huge = bytes.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Gguf::parse(&huge, path)
            .unwrap_err()
            .to_string()
            .contains("tensors"));
        // Not llama: a clear refusal.
        let mut g = Gguf::parse(&bytes, path).unwrap();
        g.metadata[0].1 = Value::Str("gpt2".into());
        let e = import(&g, path, None, &Backend::default().device()).unwrap_err();
        assert!(e.to_string().contains("llama and qwen2"), "{e}");
        // Rope scaling is refused, not ignored.
        let mut g = Gguf::parse(&bytes, path).unwrap();
        g.metadata
            .push(("llama.rope.scaling.type".into(), Value::Str("yarn".into())));
        let e = import(&g, path, None, &Backend::default().device()).unwrap_err();
        assert!(e.to_string().contains("rope scaling"), "{e}");
    }
}
