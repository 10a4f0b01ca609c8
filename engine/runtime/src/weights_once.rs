//! One copy of the weights while a file loads.
//!
//! Reading an ONNX file the obvious way holds the weights three times at its peak: the file's
//! bytes, the decoded protobuf's `raw_data`, then tract's tensors built from the protobuf. Here
//!
//! * [`decode_file`] decodes the protobuf straight from the file through a 1 MiB window
//!   ([`FileBuf`], a `prost::bytes::Buf`), so the file's bytes are never all in memory;
//! * [`hand_over`] moves each initializer's `raw_data` out of the protobuf into a
//!   [`HandOver`] data resolver and marks the initializer as external data of the model file
//!   itself, at an offset past the file's end that no real tensor can have. tract then asks the
//!   resolver for each tensor in turn; the resolver gives its bytes away (a move, no copy), tract
//!   copies them into its tensor and drops them, so at any moment a weight lives in the protobuf
//!   or in tract, plus one tensor in flight.
//!
//! Real external data (a side file) still goes through tract's own memory-mapped reader.

use prost::bytes::Buf;
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tract_onnx::data_resolver::{MmapDataResolver, ModelDataResolver};
use tract_onnx::pb::tensor_proto::DataLocation;
use tract_onnx::pb::{ModelProto, StringStringEntryProto};
use tract_onnx::prelude::TractResult;

const WINDOW: usize = 1 << 20;

/// A file read through a fixed window, as a `Buf` prost can decode from.
pub struct FileBuf {
    file: File,
    window: Vec<u8>,
    pos: usize,
    filled: usize,
    remaining: usize,
    error: Option<std::io::Error>,
}

impl FileBuf {
    fn open(path: &Path) -> std::io::Result<FileBuf> {
        let (file, len) = crate::fsio::open_regular(path)?;
        let remaining = usize::try_from(len).map_err(|_| std::io::Error::other("file too large"))?;
        let mut b = FileBuf { file, window: vec![0; WINDOW], pos: 0, filled: 0, remaining, error: None };
        b.refill();
        Ok(b)
    }

    /// Reads the next window once the current one is used up. A read error (or a file that
    /// shrank) ends the buffer early: prost then reports a truncated message, and
    /// [`decode_file`] reports the stored error instead.
    fn refill(&mut self) {
        if self.pos < self.filled || self.remaining == 0 {
            return;
        }
        let want = self.remaining.min(WINDOW);
        match self.file.read(&mut self.window[..want]) {
            Ok(n) if n > 0 => {
                self.pos = 0;
                self.filled = n;
            }
            Ok(_) => {
                self.error = Some(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the file shrank while read"));
                self.remaining = 0;
            }
            Err(e) => {
                self.error = Some(e);
                self.remaining = 0;
            }
        }
    }
}

impl Buf for FileBuf {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        &self.window[self.pos..self.filled]
    }

    fn advance(&mut self, cnt: usize) {
        assert!(cnt <= self.filled - self.pos, "advance past the current window");
        self.pos += cnt;
        self.remaining -= cnt;
        self.refill();
    }
}

/// Decodes the ONNX protobuf in `path` without holding the file's bytes.
pub fn decode_file(path: &Path) -> Result<ModelProto, String> {
    use prost::Message;
    let mut buf = FileBuf::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let decoded = ModelProto::decode(&mut buf);
    if let Some(e) = buf.error.take() {
        return Err(format!("cannot read: {e}"));
    }
    decoded.map_err(|e| format!("not a loadable ONNX model: not an ONNX protobuf ({e})"))
}

/// A data resolver that hands over the initializers [`hand_over`] took out of the protobuf, and
/// reads every other external tensor as tract does.
pub struct HandOver {
    model: PathBuf,
    first_key: usize,
    taken: Mutex<HashMap<usize, Vec<u8>>>,
}

impl ModelDataResolver for HandOver {
    fn read_bytes_from_path(
        &self,
        buf: &mut Vec<u8>,
        p: &Path,
        offset: usize,
        length: Option<usize>,
    ) -> TractResult<()> {
        if offset >= self.first_key && p == self.model {
            let bytes = self.taken.lock().expect("not poisoned").remove(&offset);
            if let Some(bytes) = bytes {
                *buf = bytes;
                return Ok(());
            }
        }
        MmapDataResolver.read_bytes_from_path(buf, p, offset, length)
    }
}

/// Moves the `raw_data` of every initializer of at least 4 KiB out of `proto` into a resolver,
/// leaving an external-data reference to `model` (the file the protobuf came from, inside its
/// folder as tract resolves it) at a key offset past the file's `file_len` bytes.
pub fn hand_over(proto: &mut ModelProto, model: &Path, file_len: u64) -> Result<HandOver, String> {
    let canonical = model.canonicalize().map_err(|e| format!("{}: {e}", model.display()))?;
    let name = model.file_name().and_then(|n| n.to_str()).ok_or("the model's file name must be valid UTF-8")?;
    let first_key = usize::try_from(file_len).map_err(|_| "file too large")? + 1;
    let mut taken = HashMap::new();
    if let Some(g) = proto.graph.as_mut() {
        for t in g.initializer.iter_mut().filter(|t| t.raw_data.len() >= 4096) {
            let key = first_key + taken.len();
            let bytes = std::mem::take(&mut t.raw_data);
            let entry = |k: &str, v: String| StringStringEntryProto { key: k.into(), value: v };
            t.external_data = vec![
                entry("location", name.into()),
                entry("offset", key.to_string()),
                entry("length", bytes.len().to_string()),
            ];
            t.data_location = Some(DataLocation::External as i32);
            taken.insert(key, bytes);
        }
    }
    Ok(HandOver { model: canonical, first_key, taken: Mutex::new(taken) })
}
