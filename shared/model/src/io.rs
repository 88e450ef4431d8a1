//! Bounded reading of untrusted model files: whole-file reads with a size cap, and a safetensors
//! reader that checks every tensor's dtype and shape before converting it.
//!
//! All conversions from f16/bf16 happen here. Nothing in this module knows about the model's
//! structure beyond "a named tensor of an expected shape".

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::error::{ModelError, Result};

/// Largest weights file read (16 GiB); anything beyond is refused before reading.
pub const MAX_WEIGHTS_BYTES: u64 = 16 << 30;

/// Reads a whole file, refusing files larger than `max` bytes before allocating for them.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    if meta.len() > max {
        return Err(ModelError::FileTooLarge {
            path: path.to_path_buf(),
            len: meta.len(),
            max,
        });
    }
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    if bytes.len() as u64 > max {
        return Err(ModelError::FileTooLarge {
            path: path.to_path_buf(),
            len: bytes.len() as u64,
            max,
        });
    }
    Ok(bytes)
}

/// A parsed safetensors file held in memory, with the path it came from for error messages.
pub struct TensorFile {
    path: PathBuf,
    bytes: Vec<u8>,
    /// Name → (dtype, shape, byte range within `bytes`), validated at open.
    index: HashMap<String, (Dtype, Vec<usize>, std::ops::Range<usize>)>,
    metadata: HashMap<String, String>,
}

impl TensorFile {
    /// Reads and validates a safetensors file (header, offsets, sizes) without trusting any field.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = read_bounded(path, MAX_WEIGHTS_BYTES)?;
        Self::from_bytes(bytes, path)
    }

    /// Validates safetensors bytes already in memory; `path` names them in errors.
    pub fn from_bytes(bytes: Vec<u8>, path: &Path) -> Result<Self> {
        let bad = |message: String| ModelError::Safetensors {
            path: path.to_path_buf(),
            message,
        };
        // The safetensors crate bounds the header size, checks the JSON, and checks that every
        // tensor's byte range matches its dtype × shape and lies inside the buffer.
        let (header_len, meta) =
            SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let data_start = 8 + header_len;
        let mut index = HashMap::new();
        for (name, view) in st.tensors() {
            let info = meta
                .info(&name)
                .ok_or_else(|| bad(format!("tensor `{name}` has no header entry")))?;
            let (s, e) = info.data_offsets;
            let range = data_start
                .checked_add(s)
                .zip(data_start.checked_add(e))
                .filter(|(a, b)| a <= b && *b <= bytes.len())
                .map(|(a, b)| a..b)
                .ok_or_else(|| bad(format!("tensor `{name}` lies outside the file")))?;
            index.insert(name, (view.dtype(), view.shape().to_vec(), range));
        }
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(Self {
            path: path.to_path_buf(),
            bytes,
            index,
            metadata,
        })
    }

    /// The path this file was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The free-form `__metadata__` map of the header.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Names of all tensors in the file.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.index.get(name).map(|(_, s, _)| s.as_slice())
    }

    fn unsupported(&self, name: &str, dtype: String) -> ModelError {
        ModelError::UnsupportedDtype {
            path: self.path.clone(),
            name: name.to_string(),
            dtype,
        }
    }

    fn entry(&self, name: &str) -> Result<&(Dtype, Vec<usize>, std::ops::Range<usize>)> {
        self.index
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })
    }

    /// Reads a float tensor (f32, f16 or bf16) of exactly `shape` as f32 values.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (dtype, found, range) = self.entry(name)?;
        if found.as_slice() != shape {
            return Err(ModelError::ShapeMismatch {
                path: self.path.clone(),
                name: name.to_string(),
                found: found.clone(),
                expected: shape.to_vec(),
            });
        }
        let raw = &self.bytes[range.clone()];
        let out: Vec<f32> = match dtype {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => return Err(self.unsupported(name, format!("{other:?}"))),
        };
        Ok(out)
    }

    /// Reads an integer tensor (i64 or i32) of any shape, returning its shape and values.
    pub fn i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
        let (dtype, shape, range) = self.entry(name)?;
        let raw = &self.bytes[range.clone()];
        let values = match dtype {
            Dtype::I64 => raw
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("chunks_exact(8)")))
                .collect(),
            Dtype::I32 => raw
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("chunks_exact(4)")) as i64)
                .collect(),
            other => return Err(self.unsupported(name, format!("{other:?}"))),
        };
        Ok((shape.clone(), values))
    }

    /// Raw bytes of a U8 tensor (used by the quantized container), with its shape.
    pub fn u8(&self, name: &str) -> Result<(&[usize], &[u8])> {
        let (dtype, shape, range) = self.entry(name)?;
        if *dtype != Dtype::U8 {
            return Err(self.unsupported(name, format!("{dtype:?} (expected U8)")));
        }
        Ok((shape.as_slice(), &self.bytes[range.clone()]))
    }
}

/// One tensor to write: name, dtype, shape and little-endian bytes.
pub struct OutTensor {
    /// Tensor name.
    pub name: String,
    /// Stored dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian data, `shape.product() * dtype.size()` bytes.
    pub data: Vec<u8>,
}

impl OutTensor {
    /// An f32 tensor.
    pub fn f32(name: impl Into<String>, shape: Vec<usize>, values: &[f32]) -> Self {
        Self {
            name: name.into(),
            dtype: Dtype::F32,
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

impl safetensors::View for &OutTensor {
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

/// Writes tensors and header metadata as a safetensors file (atomically: temp file + rename).
///
/// The bytes are a function of the arguments alone: the header's metadata is written in key order
/// and the tensors in safetensors' own order (descending dtype alignment, then name). The
/// `safetensors` crate writes its metadata map in hash order, which differs from run to run, so the
/// same model saved twice would give different files (and different digests).
pub fn write_safetensors(
    path: &Path,
    tensors: &[OutTensor],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let (header, order) =
        safetensors_header(tensors, &metadata).map_err(|message| ModelError::Safetensors {
            path: path.to_path_buf(),
            message,
        })?;
    // Streamed to the file (no second copy of the weights in memory), then renamed into place.
    write_atomic_with(path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(header.as_bytes())?;
        for t in &order {
            w.write_all(&t.data)?;
        }
        Ok(())
    })
}

/// The deterministic safetensors header of `tensors` (see `write_safetensors`, padded to 8 bytes)
/// and the order their data follows it in.
fn safetensors_header<'a>(
    tensors: &'a [OutTensor],
    metadata: &HashMap<String, String>,
) -> std::result::Result<(String, Vec<&'a OutTensor>), String> {
    use std::collections::BTreeMap;
    use std::fmt::Write as _;
    let mut order: Vec<&OutTensor> = tensors.iter().collect();
    order.sort_by(|l, r| r.dtype.cmp(&l.dtype).then(l.name.cmp(&r.name)));
    let sorted: BTreeMap<&String, &String> = metadata.iter().collect();
    let mut header = String::from("{");
    if !sorted.is_empty() {
        let _ = write!(header, "\"__metadata__\":{}", json(&sorted)?);
    }
    let mut offset = 0usize;
    for t in &order {
        let elements: usize = t.shape.iter().product();
        let expected = (elements * t.dtype.bitsize()).div_ceil(8);
        if expected != t.data.len() {
            return Err(format!(
                "tensor {} has {} bytes, its shape and dtype need {expected}",
                t.name,
                t.data.len()
            ));
        }
        if header.len() > 1 {
            header.push(',');
        }
        let _ = write!(
            header,
            "{}:{{\"dtype\":{},\"shape\":{},\"data_offsets\":[{offset},{}]}}",
            json(&t.name)?,
            json(&t.dtype)?,
            json(&t.shape)?,
            offset + t.data.len()
        );
        offset += t.data.len();
    }
    header.push('}');
    // The data starts 8-byte aligned, as the safetensors crate writes it.
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    Ok((header, order))
}

/// The compact JSON text of a value (a header field).
fn json<T: serde::Serialize + ?Sized>(value: &T) -> std::result::Result<String, String> {
    serde_json::to_string(value).map_err(|e| e.to_string())
}

/// Writes a file atomically: a sibling temporary file, then a rename over the target.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Writes a file atomically from a writer function: a sibling temporary file (buffered), then a
/// rename over the target; nothing is left at `path` if writing fails.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp-write");
    let file = std::fs::File::create(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    let mut w = std::io::BufWriter::new(file);
    let written = write(&mut w).and_then(|()| w.flush());
    if let Err(e) = written {
        drop(w);
        let _ = std::fs::remove_file(&tmp);
        return Err(ModelError::io(&tmp, e));
    }
    drop(w);
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let t = OutTensor::f32("w", vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        safetensors::serialize(vec![("w", &t)], None).unwrap()
    }

    #[test]
    fn written_files_are_deterministic_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = [
            OutTensor {
                name: "b".into(),
                dtype: Dtype::U8,
                shape: vec![3],
                data: vec![1, 2, 3],
            },
            OutTensor::f32("a", vec![2], &[1.5, -2.0]),
        ];
        let meta: HashMap<String, String> =
            (0..16).map(|i| (format!("k{i}"), "v".into())).collect();
        let path = dir.path().join("m.safetensors");
        write_safetensors(&path, &tensors, meta.clone()).unwrap();
        let first = std::fs::read(&path).unwrap();
        for _ in 0..4 {
            // A fresh map has a fresh hash seed, so a hash-ordered header would differ here.
            let again: HashMap<String, String> = meta.clone().into_iter().collect();
            write_safetensors(&path, &tensors, again).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), first);
        }
        let (_, parsed) = SafeTensors::read_metadata(&first).unwrap();
        assert_eq!(parsed.metadata().as_ref().unwrap().len(), 16);
        let f = TensorFile::from_bytes(first, &path).unwrap();
        assert_eq!(f.f32("a", &[2]).unwrap(), vec![1.5, -2.0]);
        let wrong = [OutTensor {
            name: "c".into(),
            dtype: Dtype::F32,
            shape: vec![2],
            data: vec![0; 3],
        }];
        assert!(matches!(
            write_safetensors(&path, &wrong, HashMap::new()),
            Err(ModelError::Safetensors { .. })
        ));
    }

    #[test]
    fn round_trip_and_shape_check() {
        let f = TensorFile::from_bytes(sample(), Path::new("m.safetensors")).unwrap();
        assert_eq!(f.f32("w", &[2, 3]).unwrap()[5], 6.0);
        assert!(matches!(
            f.f32("w", &[3, 2]),
            Err(ModelError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            f.f32("x", &[1]),
            Err(ModelError::MissingTensor { .. })
        ));
    }

    #[test]
    fn every_truncation_is_a_typed_error() {
        let bytes = sample();
        for cut in 0..bytes.len() {
            let r = TensorFile::from_bytes(bytes[..cut].to_vec(), Path::new("m.safetensors"));
            match r {
                Err(ModelError::Safetensors { path, .. }) => {
                    assert_eq!(path, Path::new("m.safetensors"))
                }
                Err(e) => panic!("cut {cut}: unexpected error {e}"),
                Ok(_) => panic!("cut {cut}: truncated file accepted"),
            }
        }
    }

    #[test]
    fn hostile_headers_are_refused_without_allocating() {
        // Header length claims 2^63 bytes.
        let mut b = (1u64 << 63).to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        assert!(TensorFile::from_bytes(b, Path::new("h")).is_err());
        // Offsets beyond the buffer, and a shape whose size overflows.
        for header in [
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8000]}}"#,
            r#"{"w":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,16]}}"#,
            r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
        ] {
            let mut b = (header.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(header.as_bytes());
            b.extend_from_slice(&[0u8; 16]);
            assert!(
                TensorFile::from_bytes(b, Path::new("h")).is_err(),
                "{header}"
            );
        }
    }

    #[test]
    fn oversized_file_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        std::fs::write(&p, vec![0u8; 100]).unwrap();
        assert!(matches!(
            read_bounded(&p, 10),
            Err(ModelError::FileTooLarge { .. })
        ));
    }
}
