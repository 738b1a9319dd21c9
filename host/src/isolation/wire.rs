//! The worker-process protocol: frames over the Unix socket between a host's proxy and its
//! worker process.
//!
//! A frame is a little-endian `u64` length and that many bytes (the payload): a tag byte and
//! the message's fields, written with one `write` call. Strings and byte strings are a `u32` length and the bytes; lists a `u32` count and the
//! items. Nothing is trusted: a frame longer than [`MAX_FRAME`], a truncated field, a string
//! that is not UTF-8 or an unknown tag is an error, and a frame's bytes are read as they arrive
//! (a claimed length allocates nothing up front).

use std::io::Read;

use abi_stable::std_types::RVec;
use cresset_plugin_api::{
    DeviceType, ErrorCode, InstanceAssignment, KeyValue, ModelSpec, PluginError, Request, Response,
};

/// The longest frame either side accepts (a request or response body is at most this).
pub const MAX_FRAME: u64 = 1 << 30;

/// What the host sends its worker process.
#[derive(Debug)]
pub enum ToWorker {
    /// The first message: what to load and where to run.
    Init(Init),
    /// Run `execute` (or `explain`) on these requests.
    Execute {
        /// `explain` instead of `execute`.
        explain: bool,
        /// The call's key for cancellations: its sequence number when its requests are
        /// numbered from 0 (a batch), or [`CONTINUOUS`] when request numbers run on across
        /// calls (continuous batching).
        key: u64,
        /// The requests.
        requests: Vec<Request>,
    },
    /// The client of the request at `index` of the call with `key` went away.
    Cancel {
        /// The call's key (see [`ToWorker::Execute`]).
        key: u64,
        /// The request's number.
        index: u64,
    },
}

/// The call key of continuous batching, whose request numbers run on across calls.
pub const CONTINUOUS: u64 = 0;

/// The most items a list in a frame may hold (headers, parameters, labels, log fields).
pub const MAX_ITEMS: usize = 4096;

/// What a worker process loads.
#[derive(Debug, Clone)]
pub struct Init {
    /// The plugin library (its staged, content-addressed copy).
    pub library: String,
    /// The model, as `load_model` takes it.
    pub spec: ModelSpec,
    /// The instance's place.
    pub assignment: InstanceAssignment,
    /// The most verbose log level the host records from plugins.
    pub log_level: u8,
}

/// What a worker process sends its host.
#[derive(Debug)]
pub enum ToHost {
    /// The model and instance are loaded; the model's metadata.
    Ready(String),
    /// The plugin refused to load (`load_model` or `new_instance` returned an error).
    InitFailed(PluginError),
    /// An intermediate chunk for the request at an index.
    Chunk(u64, Response),
    /// The final response for the request at an index.
    Final(u64, Result<Response, PluginError>),
    /// The `execute`/`explain` call returned.
    Done(Result<(), PluginError>),
    /// A plugin log record.
    Log {
        /// Its `LogLevel`.
        level: u8,
        /// The plugin's target.
        target: String,
        /// The message.
        message: String,
        /// Structured fields.
        fields: Vec<KeyValue>,
    },
    /// A plugin metric.
    Metric {
        /// Its `MetricKind`.
        kind: u8,
        /// The metric's name.
        name: String,
        /// Its help text.
        help: String,
        /// Its labels.
        labels: Vec<KeyValue>,
        /// The value.
        value: f64,
    },
}

/// A frame that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The other side closed the socket (between frames).
    #[error("the worker socket was closed")]
    Closed,
    /// The socket failed or closed mid-frame.
    #[error("the worker socket failed: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a message.
    #[error("a malformed frame on the worker socket: {0}")]
    Malformed(String),
}

fn malformed(what: impl Into<String>) -> WireError {
    WireError::Malformed(what.into())
}

/// Reads frames from a stream as its bytes arrive, keeping a partial frame across reads, so
/// that a read timeout on the stream (the host polls for cancelled requests) loses nothing.
#[derive(Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    /// The next frame's payload: `Ok(None)` when the stream's read timed out first, `Err`
    /// ([`WireError::Closed`]) at a clean end between frames.
    pub fn next(&mut self, input: &mut impl Read) -> Result<Option<Vec<u8>>, WireError> {
        loop {
            if let Some(frame) = self.complete()? {
                return Ok(Some(frame));
            }
            let mut chunk = [0u8; 64 * 1024];
            match input.read(&mut chunk) {
                Ok(0) if self.buf.is_empty() => return Err(WireError::Closed),
                Ok(0) => {
                    return Err(malformed(format!(
                        "the stream ended inside a frame ({} bytes of it)",
                        self.buf.len()
                    )))
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A whole frame's payload from the front of the buffer, if there is one.
    fn complete(&mut self) -> Result<Option<Vec<u8>>, WireError> {
        let Some(head) = self.buf.first_chunk::<8>() else {
            return Ok(None);
        };
        let len = u64::from_le_bytes(*head);
        if len > MAX_FRAME {
            return Err(malformed(format!(
                "a frame of {len} bytes is over the limit of {MAX_FRAME}"
            )));
        }
        let end = 8 + len as usize;
        if self.buf.len() < end {
            return Ok(None);
        }
        let payload = self.buf[8..end].to_vec();
        self.buf.drain(..end);
        // A large frame's room is not kept for the small ones that follow.
        if self.buf.capacity() > 1 << 20 && self.buf.len() < 1 << 16 {
            self.buf.shrink_to(1 << 16);
        }
        Ok(Some(payload))
    }
}

/// Builds a frame: its length (filled in by [`Enc::finish`]) and its payload.
struct Enc(Vec<u8>);

impl Enc {
    fn frame() -> Self {
        Self(vec![0; 8])
    }
    fn finish(mut self) -> Vec<u8> {
        let len = (self.0.len() - 8) as u64;
        self.0[..8].copy_from_slice(&len.to_le_bytes());
        self.0
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn len(&mut self, n: usize) -> &mut Self {
        // Frames are capped far below 4 Gi items; a longer list fails the frame cap instead.
        self.u32(u32::try_from(n).unwrap_or(u32::MAX))
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.len(v.len());
        self.0.extend_from_slice(v);
        self
    }
    fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }
    fn pairs(&mut self, pairs: &[KeyValue]) -> &mut Self {
        self.len(pairs.len());
        for kv in pairs {
            self.str(&kv.key).str(&kv.value);
        }
        self
    }
    fn error(&mut self, e: &PluginError) -> &mut Self {
        self.u32(e.code.0).str(&e.message)
    }
    fn response(&mut self, r: &Response) -> &mut Self {
        self.u32(r.status.into())
            .str(&r.content_type)
            .bytes(&r.body)
            .pairs(&r.headers)
    }
    fn result<T>(
        &mut self,
        r: &Result<T, PluginError>,
        ok: impl FnOnce(&mut Self, &T),
    ) -> &mut Self {
        match r {
            Ok(v) => {
                self.u8(0);
                ok(self, v);
            }
            Err(e) => {
                self.u8(1).error(e);
            }
        }
        self
    }
}

/// Reads a frame's payload.
struct Dec<'a> {
    buf: &'a [u8],
}

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(malformed(format!("the frame ends inside {what}")));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &str) -> Result<u32, WireError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, WireError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self, what: &str) -> Result<&'a [u8], WireError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }
    fn string(&mut self, what: &str) -> Result<String, WireError> {
        let b = self.bytes(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| malformed(format!("{what} is not UTF-8")))
    }
    /// A list's count, checked against what the frame could hold (`min` bytes per item), so
    /// that a hostile count allocates nothing.
    fn count(&mut self, min: usize, what: &str) -> Result<usize, WireError> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(min) > self.buf.len() {
            return Err(malformed(format!("{what} claims {n} items")));
        }
        Ok(n)
    }
    fn pairs(&mut self, what: &str) -> Result<Vec<KeyValue>, WireError> {
        let n = self.count(8, what)?;
        if n > MAX_ITEMS {
            return Err(malformed(format!("{what}: {n} items, over {MAX_ITEMS}")));
        }
        (0..n)
            .map(|_| Ok(KeyValue::new(self.string(what)?, self.string(what)?)))
            .collect()
    }
    fn error(&mut self) -> Result<PluginError, WireError> {
        let code = ErrorCode(self.u32("an error code")?);
        Ok(PluginError::new(code, self.string("an error message")?))
    }
    fn response(&mut self) -> Result<Response, WireError> {
        let status = self.u32("a status")?;
        let status = u16::try_from(status)
            .map_err(|_| malformed(format!("status {status} is not an HTTP status")))?;
        Ok(Response {
            status,
            content_type: self.string("a content type")?.into(),
            body: RVec::from(self.bytes("a body")?.to_vec()),
            headers: self.pairs("response headers")?.into(),
        })
    }
    fn result<T>(
        &mut self,
        ok: impl FnOnce(&mut Self) -> Result<T, WireError>,
    ) -> Result<Result<T, PluginError>, WireError> {
        match self.u8("a result")? {
            0 => Ok(Ok(ok(self)?)),
            1 => Ok(Err(self.error()?)),
            t => Err(malformed(format!("result tag {t}"))),
        }
    }
    fn end(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(malformed(format!(
                "{} bytes after the message",
                self.buf.len()
            )))
        }
    }
}

/// The frame of [`ToWorker::Execute`], from borrowed requests (bodies are copied once, into
/// the frame).
pub fn encode_execute(explain: bool, key: u64, requests: &[Request]) -> Vec<u8> {
    let mut e = Enc::frame();
    e.u8(2).u8(u8::from(explain)).u64(key).len(requests.len());
    for r in requests {
        e.str(&r.id)
            .str(&r.content_type)
            .bytes(&r.body)
            .pairs(&r.headers)
            .pairs(&r.params);
    }
    e.finish()
}

impl ToWorker {
    /// The whole frame (its length, then the payload [`Self::decode`] reads).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::frame();
        match self {
            Self::Init(init) => {
                let (spec, a) = (&init.spec, &init.assignment);
                e.u8(1)
                    .str(&init.library)
                    .str(&spec.name)
                    .str(&spec.version)
                    .str(&spec.model_dir)
                    .str(&spec.handler_config_json)
                    .str(&spec.model_config_json)
                    .u32(a.index)
                    .u8(a.device_type.0)
                    .len(a.device_ids.len());
                for id in a.device_ids.iter() {
                    e.u32(*id as u32);
                }
                e.u32(a.intra_op_threads).u8(init.log_level);
            }
            Self::Execute {
                explain,
                key,
                requests,
            } => return encode_execute(*explain, *key, requests),
            Self::Cancel { key, index } => {
                e.u8(3).u64(*key).u64(*index);
            }
        }
        e.finish()
    }

    /// Read a frame's payload.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut d = Dec { buf };
        let message = match d.u8("a tag")? {
            1 => {
                let library = d.string("the library path")?;
                let spec = ModelSpec {
                    name: d.string("the model name")?.into(),
                    version: d.string("the version")?.into(),
                    model_dir: d.string("the model folder")?.into(),
                    handler_config_json: d.string("the handler config")?.into(),
                    model_config_json: d.string("the model config")?.into(),
                };
                let index = d.u32("the instance index")?;
                let device_type = DeviceType(d.u8("the device type")?);
                let n = d.count(4, "device ids")?;
                let device_ids = (0..n)
                    .map(|_| Ok(d.u32("a device id")? as i32))
                    .collect::<Result<Vec<i32>, WireError>>()?;
                let assignment = InstanceAssignment {
                    index,
                    device_type,
                    device_ids: device_ids.into(),
                    intra_op_threads: d.u32("the thread count")?,
                };
                let log_level = d.u8("the log level")?;
                Self::Init(Init {
                    library,
                    spec,
                    assignment,
                    log_level,
                })
            }
            2 => {
                let explain = d.u8("the call kind")? == 1;
                let key = d.u64("the call key")?;
                let n = d.count(20, "requests")?;
                let mut requests = Vec::with_capacity(n);
                for _ in 0..n {
                    requests.push(Request {
                        id: d.string("a request id")?.into(),
                        content_type: d.string("a content type")?.into(),
                        body: RVec::from(d.bytes("a body")?.to_vec()),
                        headers: d.pairs("request headers")?.into(),
                        params: d.pairs("request parameters")?.into(),
                    });
                }
                Self::Execute {
                    explain,
                    key,
                    requests,
                }
            }
            3 => Self::Cancel {
                key: d.u64("a call key")?,
                index: d.u64("an index")?,
            },
            t => return Err(malformed(format!("unknown message tag {t} from the host"))),
        };
        d.end()?;
        Ok(message)
    }
}

impl ToHost {
    /// The whole frame (its length, then the payload [`Self::decode`] reads).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::frame();
        match self {
            Self::Ready(metadata) => {
                e.u8(1).str(metadata);
            }
            Self::InitFailed(error) => {
                e.u8(2).error(error);
            }
            Self::Chunk(index, response) => {
                e.u8(3).u64(*index).response(response);
            }
            Self::Final(index, result) => {
                e.u8(4).u64(*index).result(result, |e, r| {
                    e.response(r);
                });
            }
            Self::Done(result) => {
                e.u8(5).result(result, |_, ()| {});
            }
            Self::Log {
                level,
                target,
                message,
                fields,
            } => {
                e.u8(6).u8(*level).str(target).str(message).pairs(fields);
            }
            Self::Metric {
                kind,
                name,
                help,
                labels,
                value,
            } => {
                e.u8(7)
                    .u8(*kind)
                    .str(name)
                    .str(help)
                    .pairs(labels)
                    .u64(value.to_bits());
            }
        }
        e.finish()
    }

    /// Read a frame's payload.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut d = Dec { buf };
        let message = match d.u8("a tag")? {
            1 => Self::Ready(d.string("the metadata")?),
            2 => Self::InitFailed(d.error()?),
            3 => Self::Chunk(d.u64("an index")?, d.response()?),
            4 => {
                let index = d.u64("an index")?;
                Self::Final(index, d.result(|d| d.response())?)
            }
            5 => Self::Done(d.result(|_| Ok(()))?),
            6 => Self::Log {
                level: d.u8("a log level")?,
                target: d.string("a log target")?,
                message: d.string("a log message")?,
                fields: d.pairs("log fields")?,
            },
            7 => Self::Metric {
                kind: d.u8("a metric kind")?,
                name: d.string("a metric name")?,
                help: d.string("a metric help")?,
                labels: d.pairs("metric labels")?,
                value: f64::from_bits(d.u64("a metric value")?),
            },
            t => return Err(malformed(format!("unknown message tag {t} from a worker"))),
        };
        d.end()?;
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame's payload (what `decode` reads), checking its length prefix.
    fn payload(frame: Vec<u8>) -> Vec<u8> {
        let len = u64::from_le_bytes(frame[..8].try_into().expect("8 bytes"));
        assert_eq!(len as usize, frame.len() - 8);
        frame[8..].to_vec()
    }

    fn request(id: &str, body: &[u8]) -> Request {
        Request {
            id: id.into(),
            content_type: "application/json".into(),
            body: body.to_vec().into(),
            headers: vec![KeyValue::new("x-a", "1")].into(),
            params: vec![KeyValue::new("topk", "5")].into(),
        }
    }

    #[test]
    fn every_message_reads_back_as_written() {
        let init = ToWorker::Init(Init {
            library: "/run/abc-libx.so".into(),
            spec: ModelSpec {
                name: "m".into(),
                version: "1.0".into(),
                model_dir: "/models/m".into(),
                handler_config_json: "{\"a\":1}".into(),
                model_config_json: "{}".into(),
            },
            assignment: InstanceAssignment {
                index: 3,
                device_type: DeviceType::GPU,
                device_ids: vec![0, 2].into(),
                intra_op_threads: 4,
            },
            log_level: 2,
        });
        let ToWorker::Init(back) = ToWorker::decode(&payload(init.encode())).expect("init") else {
            panic!("not init");
        };
        assert_eq!(back.library, "/run/abc-libx.so");
        assert_eq!(back.spec.handler_config_json.as_str(), "{\"a\":1}");
        assert_eq!(back.assignment.device_ids.to_vec(), [0, 2]);
        assert_eq!(back.assignment.intra_op_threads, 4);
        assert_eq!(back.log_level, 2);

        let body: Vec<u8> = (0..=255u8).collect();
        let execute = ToWorker::Execute {
            explain: true,
            key: 9,
            requests: vec![request("a", &body), request("b", b"")],
        };
        let ToWorker::Execute {
            explain,
            key,
            requests,
        } = ToWorker::decode(&payload(execute.encode())).expect("execute")
        else {
            panic!("not execute");
        };
        assert!(explain);
        assert_eq!(key, 9);
        assert_eq!(requests.len(), 2);
        assert_eq!(requests[0].body.as_slice(), body.as_slice());
        assert_eq!(requests[1].param("topk"), Some("5"));
        assert!(matches!(
            ToWorker::decode(&payload(ToWorker::Cancel { key: 3, index: 7 }.encode())),
            Ok(ToWorker::Cancel { key: 3, index: 7 })
        ));

        let mut response = Response::ok("text/plain", "hi");
        response.status = 201;
        response.headers = vec![KeyValue::new("x-b", "2")].into();
        let messages = [
            ToHost::Ready("{\"inputs\":[]}".into()),
            ToHost::InitFailed(PluginError::invalid_input("bad `topk`")),
            ToHost::Chunk(9, response.clone()),
            ToHost::Final(1, Ok(response.clone())),
            ToHost::Final(2, Err(PluginError::internal("boom"))),
            ToHost::Done(Ok(())),
            ToHost::Done(Err(PluginError::unsupported("no"))),
            ToHost::Log {
                level: 3,
                target: "t".into(),
                message: "m".into(),
                fields: vec![KeyValue::new("k", "v")],
            },
            ToHost::Metric {
                kind: 0,
                name: "n".into(),
                help: "h".into(),
                labels: vec![],
                value: 2.5,
            },
        ];
        for message in messages {
            let back = ToHost::decode(&payload(message.encode())).expect("decodes");
            assert_eq!(format!("{message:?}"), format!("{back:?}"));
        }
    }

    #[test]
    fn frames_cross_a_stream_in_pieces_and_a_clean_end_is_closed() {
        let mut stream = ToWorker::Cancel { key: 0, index: 1 }.encode();
        stream.extend(ToHost::Done(Ok(())).encode());
        // A reader that gives a few bytes per read, then times out, as a slow socket does.
        struct Trickle<'a>(&'a [u8], bool);
        impl Read for Trickle<'_> {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                self.1 = !self.1;
                if self.1 && !self.0.is_empty() {
                    return Err(std::io::ErrorKind::WouldBlock.into());
                }
                let n = self.0.len().min(out.len()).min(3);
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut input = Trickle(&stream, false);
        let mut reader = FrameReader::default();
        let mut frames = Vec::new();
        let mut timeouts = 0;
        loop {
            match reader.next(&mut input) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => timeouts += 1,
                Err(WireError::Closed) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(timeouts > 0);
        assert_eq!(frames.len(), 2);
        assert!(matches!(
            ToWorker::decode(&frames[0]),
            Ok(ToWorker::Cancel { key: 0, index: 1 })
        ));
        assert!(matches!(
            ToHost::decode(&frames[1]),
            Ok(ToHost::Done(Ok(())))
        ));
    }

    #[test]
    fn hostile_frames_are_errors_that_allocate_nothing() {
        // A length over the cap, one the stream never delivers, and a cut length.
        let next = |bytes: &[u8]| FrameReader::default().next(&mut &bytes[..]);
        assert!(matches!(
            next(&(MAX_FRAME + 1).to_le_bytes()),
            Err(WireError::Malformed(_))
        ));
        let mut short = 1000u64.to_le_bytes().to_vec();
        short.extend_from_slice(b"abc");
        assert!(matches!(next(&short), Err(WireError::Malformed(_))));
        assert!(matches!(next(&[1u8, 0]), Err(WireError::Malformed(_))));
        // A list that claims four billion items, a truncated field, bad UTF-8, stray bytes,
        // an unknown tag, a status past u16.
        let mut many = vec![2u8, 0];
        many.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(ToWorker::decode(&many).is_err());
        let full = payload(ToHost::Chunk(1, Response::ok("text/plain", "body")).encode());
        for cut in 0..full.len() {
            assert!(ToHost::decode(&full[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = vec![1u8];
        bad.extend_from_slice(&2u32.to_le_bytes());
        bad.extend_from_slice(&[0xff, 0xfe]);
        assert!(ToHost::decode(&bad).is_err());
        let mut extra = payload(ToHost::Done(Ok(())).encode());
        extra.push(0);
        assert!(ToHost::decode(&extra).is_err());
        assert!(ToHost::decode(&[99]).is_err());
        let mut status = vec![3u8];
        status.extend_from_slice(&0u64.to_le_bytes());
        status.extend_from_slice(&70_000u32.to_le_bytes());
        assert!(ToHost::decode(&status).is_err());
    }
}
