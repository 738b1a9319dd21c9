//! The worker-process protocol: frames over the Unix socket between a host's proxy and its
//! worker process.
//!
//! A frame is a little-endian `u64` length and that many bytes: a tag byte and the message's
//! fields. Strings and byte strings are a `u32` length and the bytes; lists a `u32` count and the
//! items. Nothing is trusted: a frame longer than [`MAX_FRAME`], a truncated field, a string
//! that is not UTF-8 or an unknown tag is an error, and a frame's bytes are read as they arrive
//! (a claimed length allocates nothing up front).

use std::io::{Read, Write};

use abi_stable::std_types::RVec;
use cresset_plugin_api::{
    DeviceType, ErrorCode, InstanceAssignment, KeyValue, ModelSpec, PluginError, Request, Response,
};

/// The longest frame either side accepts (a request or response body is at most this).
pub const MAX_FRAME: u64 = 1 << 32;

/// What the host sends its worker process.
#[derive(Debug)]
pub enum ToWorker {
    /// The first message: what to load and where to run.
    Init(Init),
    /// Run `execute` (or `explain`) on these requests.
    Execute {
        /// `explain` instead of `execute`.
        explain: bool,
        /// The requests.
        requests: Vec<Request>,
    },
    /// The client of the request at this index (as the worker numbers them) went away.
    Cancel(u64),
}

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

/// Write one frame (the message's bytes, as [`ToWorker::encode`] or [`ToHost::encode`] made
/// them).
pub fn write_frame(out: &mut impl Write, payload: &[u8]) -> std::io::Result<()> {
    out.write_all(&(payload.len() as u64).to_le_bytes())?;
    out.write_all(payload)?;
    out.flush()
}

/// Read one frame; `None` at a clean end of stream (between frames).
pub fn read_frame(input: &mut impl Read) -> Result<Option<Vec<u8>>, WireError> {
    let mut len = [0u8; 8];
    let mut got = 0;
    while got < len.len() {
        match input.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(malformed("the stream ended inside a frame's length")),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u64::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(malformed(format!(
            "a frame of {len} bytes is over the limit of {MAX_FRAME}"
        )));
    }
    let mut payload = Vec::new();
    input.take(len).read_to_end(&mut payload)?;
    if payload.len() as u64 != len {
        return Err(malformed(format!(
            "the stream ended after {} of a frame's {len} bytes",
            payload.len()
        )));
    }
    Ok(Some(payload))
}

/// Builds a frame's payload.
#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
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

/// The payload of [`ToWorker::Execute`], from borrowed requests (bodies are copied once, into
/// the frame).
pub fn encode_execute(explain: bool, requests: &[Request]) -> Vec<u8> {
    let mut e = Enc::default();
    e.u8(2).u8(u8::from(explain)).len(requests.len());
    for r in requests {
        e.str(&r.id)
            .str(&r.content_type)
            .bytes(&r.body)
            .pairs(&r.headers)
            .pairs(&r.params);
    }
    e.0
}

impl ToWorker {
    /// The frame's payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
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
            Self::Execute { explain, requests } => return encode_execute(*explain, requests),
            Self::Cancel(index) => {
                e.u8(3).u64(*index);
            }
        }
        e.0
    }

    /// Read a payload.
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
                Self::Execute { explain, requests }
            }
            3 => Self::Cancel(d.u64("an index")?),
            t => return Err(malformed(format!("unknown message tag {t} from the host"))),
        };
        d.end()?;
        Ok(message)
    }
}

impl ToHost {
    /// The frame's payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
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
        e.0
    }

    /// Read a payload.
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
        let ToWorker::Init(back) = ToWorker::decode(&init.encode()).expect("init") else {
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
            requests: vec![request("a", &body), request("b", b"")],
        };
        let ToWorker::Execute { explain, requests } =
            ToWorker::decode(&execute.encode()).expect("execute")
        else {
            panic!("not execute");
        };
        assert!(explain);
        assert_eq!(requests.len(), 2);
        assert_eq!(requests[0].body.as_slice(), body.as_slice());
        assert_eq!(requests[1].param("topk"), Some("5"));
        assert!(matches!(
            ToWorker::decode(&ToWorker::Cancel(7).encode()),
            Ok(ToWorker::Cancel(7))
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
            let back = ToHost::decode(&message.encode()).expect("decodes");
            assert_eq!(format!("{message:?}"), format!("{back:?}"));
        }
    }

    #[test]
    fn frames_cross_a_stream_and_a_clean_end_is_none() {
        let mut stream = Vec::new();
        write_frame(&mut stream, &ToWorker::Cancel(1).encode()).expect("write");
        write_frame(&mut stream, &ToHost::Done(Ok(())).encode()).expect("write");
        let mut input = stream.as_slice();
        let a = read_frame(&mut input).expect("read").expect("a frame");
        assert!(matches!(ToWorker::decode(&a), Ok(ToWorker::Cancel(1))));
        let b = read_frame(&mut input).expect("read").expect("a frame");
        assert!(matches!(ToHost::decode(&b), Ok(ToHost::Done(Ok(())))));
        assert!(read_frame(&mut input).expect("clean end").is_none());
    }

    #[test]
    fn hostile_frames_are_errors_that_allocate_nothing() {
        // A length over the cap, and one the stream never delivers.
        let huge = (MAX_FRAME + 1).to_le_bytes();
        assert!(read_frame(&mut huge.as_slice()).is_err());
        let mut short = 1000u64.to_le_bytes().to_vec();
        short.extend_from_slice(b"abc");
        assert!(read_frame(&mut short.as_slice()).is_err());
        assert!(
            read_frame(&mut [1u8, 0].as_slice()).is_err(),
            "a cut length"
        );
        // A list that claims four billion items, a truncated field, bad UTF-8, stray bytes,
        // an unknown tag, a status past u16.
        let mut many = vec![2u8, 0];
        many.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(ToWorker::decode(&many).is_err());
        let full = ToHost::Chunk(1, Response::ok("text/plain", "body")).encode();
        for cut in 0..full.len() {
            assert!(ToHost::decode(&full[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = vec![1u8];
        bad.extend_from_slice(&2u32.to_le_bytes());
        bad.extend_from_slice(&[0xff, 0xfe]);
        assert!(ToHost::decode(&bad).is_err());
        let mut extra = ToHost::Done(Ok(())).encode();
        extra.push(0);
        assert!(ToHost::decode(&extra).is_err());
        assert!(ToHost::decode(&[99]).is_err());
        let mut status = vec![3u8];
        status.extend_from_slice(&0u64.to_le_bytes());
        status.extend_from_slice(&70_000u32.to_le_bytes());
        assert!(ToHost::decode(&status).is_err());
    }
}
