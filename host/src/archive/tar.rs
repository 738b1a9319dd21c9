//! A streaming tar reader written for hostile input: it never reads more of an entry than it
//! is asked to, refuses extension headers (GNU long names and links, pax records) over a small
//! limit *before* reading them, and keeps at most one of each in memory. The `tar` crate reads
//! those whole, so a 1.5 MiB `.tar.gz` holding a 1.5 GiB "file name" took a server to 7.7 GiB.
//!
//! Formats: POSIX ustar (with its name prefix), GNU (`L`/`K` long names and links), pax
//! (`x` local records `path`, `linkpath` and `size`; `g` global records are read and ignored).
//! Like `tar --ignore-zeros`, the end-of-archive marker does not stop reading: archives
//! concatenated after it (`cat a.tar.gz b.tar.gz`) are read too, and what follows the last one
//! must be zeros or nothing.

use std::io::{self, Read};
use std::path::PathBuf;

const BLOCK: usize = 512;

/// What a tar entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file (`0`, NUL, or `7` contiguous).
    File,
    /// A folder (`5`).
    Dir,
    /// A symbolic link (`2`).
    Symlink,
    /// A hard link (`1`).
    HardLink,
    /// Anything else, by its type flag.
    Other(u8),
}

impl EntryKind {
    fn of(flag: u8) -> Self {
        match flag {
            b'0' | 0 | b'7' => Self::File,
            b'5' => Self::Dir,
            b'2' => Self::Symlink,
            b'1' => Self::HardLink,
            other => Self::Other(other),
        }
    }

    /// A name for error messages.
    pub fn describe(self) -> String {
        match self {
            Self::File => "file".into(),
            Self::Dir => "folder".into(),
            Self::Symlink => "symbolic link".into(),
            Self::HardLink => "hard link".into(),
            Self::Other(b'3') => "character device".into(),
            Self::Other(b'4') => "block device".into(),
            Self::Other(b'6') => "FIFO".into(),
            Self::Other(b'S') => "GNU sparse file".into(),
            Self::Other(b'V') => "volume label".into(),
            Self::Other(b'M') => "multi-volume continuation".into(),
            Self::Other(flag) if flag.is_ascii_graphic() => {
                format!("tar entry of type `{}`", flag as char)
            }
            Self::Other(flag) => format!("tar entry of type {flag}"),
        }
    }
}

/// One entry's header, extension records applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its path, as raw bytes.
    pub path: Vec<u8>,
    /// What it is.
    pub kind: EntryKind,
    /// The bytes of data that follow.
    pub size: u64,
    /// Where a link points, as raw bytes.
    pub link: Vec<u8>,
}

impl Entry {
    /// The path as a path.
    pub fn path_buf(&self) -> PathBuf {
        use std::os::unix::ffi::OsStrExt;
        PathBuf::from(std::ffi::OsStr::from_bytes(&self.path))
    }

    /// The link target as a path.
    pub fn link_buf(&self) -> PathBuf {
        use std::os::unix::ffi::OsStrExt;
        PathBuf::from(std::ffi::OsStr::from_bytes(&self.link))
    }
}

/// Why a tar stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// An extension header (long name, long link, pax records) over the limit.
    #[error(
        "a tar extension header ({kind}) of {size} bytes is larger than the {limit} bytes allowed"
    )]
    ExtensionTooLarge {
        /// Which kind.
        kind: &'static str,
        /// Its declared size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The stream is not a valid tar.
    #[error("{0}")]
    Corrupt(String),
    /// Reading failed (including the caller's budget, which fails reads).
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads entries from a tar stream.
pub struct TarReader<R> {
    inner: R,
    /// Data bytes of the current entry not yet read.
    remaining: u64,
    /// Padding after the current entry's data.
    padding: u64,
    /// The most bytes an extension header may hold.
    extension_limit: u64,
    /// An end-of-archive marker was seen: what follows may only be zeros or more archives.
    after_end: bool,
    done: bool,
}

/// Read a whole block, or nothing at the end of the stream.
fn read_block(r: &mut impl Read, block: &mut [u8; BLOCK]) -> Result<bool, TarError> {
    let mut filled = 0;
    while filled < BLOCK {
        match r.read(&mut block[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => {
                return Err(TarError::Corrupt(
                    "the tar stream ends inside a header".into(),
                ))
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// A NUL-terminated field.
fn field(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

/// A numeric field: octal ASCII (spaces and NULs around it), or GNU's base-256 (high bit set).
fn number(bytes: &[u8], what: &str) -> Result<u64, TarError> {
    if bytes.first().is_some_and(|b| b & 0x80 != 0) {
        if bytes[0] & 0x40 != 0 {
            return Err(TarError::Corrupt(format!(
                "negative {what} in a tar header"
            )));
        }
        let mut value: u64 = u64::from(bytes[0] & 0x3f);
        for &b in &bytes[1..] {
            value = value
                .checked_mul(256)
                .and_then(|v| v.checked_add(u64::from(b)))
                .ok_or_else(|| TarError::Corrupt(format!("{what} in a tar header overflows")))?;
        }
        return Ok(value);
    }
    let text = field(bytes);
    let digits = std::str::from_utf8(text)
        .map_err(|_| TarError::Corrupt(format!("{what} in a tar header is not a number")))?
        .trim_matches(|c: char| c == ' ' || c == '\0');
    if digits.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(digits, 8)
        .map_err(|_| TarError::Corrupt(format!("{what} in a tar header is not octal: {digits:?}")))
}

fn checksum_ok(block: &[u8; BLOCK]) -> Result<bool, TarError> {
    let stored = number(&block[148..156], "checksum")?;
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    Ok(stored == unsigned || i64::try_from(stored).is_ok_and(|s| s == signed))
}

/// One pax record: key and value.
type PaxRecord<'a> = (&'a [u8], &'a [u8]);

/// Pax records: `"<len> <key>=<value>\n"` each.
fn pax_records(data: &[u8]) -> Result<Vec<PaxRecord<'_>>, TarError> {
    let bad = || TarError::Corrupt("malformed pax extended header".into());
    let mut records = Vec::new();
    let mut rest = data;
    while !rest.is_empty() && rest[0] != 0 {
        let space = rest.iter().position(|&b| b == b' ').ok_or_else(bad)?;
        let len: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or_else(bad)?;
        if len <= space + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad());
        }
        let record = &rest[space + 1..len - 1];
        let eq = record.iter().position(|&b| b == b'=').ok_or_else(bad)?;
        records.push((&record[..eq], &record[eq + 1..]));
        rest = &rest[len..];
    }
    Ok(records)
}

impl<R: Read> TarReader<R> {
    /// A reader over `inner` (decompressed bytes) whose extension headers may hold at most
    /// `extension_limit` bytes.
    pub fn new(inner: R, extension_limit: u64) -> Self {
        Self {
            inner,
            remaining: 0,
            padding: 0,
            extension_limit,
            after_end: false,
            done: false,
        }
    }

    /// Skip `n` bytes of the stream (they still pass through `inner`, and so count).
    fn skip(&mut self, mut n: u64) -> Result<(), TarError> {
        let mut scratch = [0u8; 8192];
        while n > 0 {
            let want = n.min(scratch.len() as u64) as usize;
            let got = self.inner.read(&mut scratch[..want])?;
            if got == 0 {
                return Err(TarError::Corrupt(
                    "the tar stream ends inside an entry".into(),
                ));
            }
            n -= got as u64;
        }
        Ok(())
    }

    /// Read an extension header's data (already checked against the limit) and its padding.
    fn read_extension(&mut self, size: u64) -> Result<Vec<u8>, TarError> {
        let mut data = vec![0u8; size as usize];
        self.inner.read_exact(&mut data).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                TarError::Corrupt("the tar stream ends inside an extension header".into())
            } else {
                TarError::Io(e)
            }
        })?;
        self.skip(size.next_multiple_of(BLOCK as u64) - size)?;
        Ok(data)
    }

    /// The next entry (the unread data of the previous one is skipped), or `None` at the end.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, TarError> {
        if self.done {
            return Ok(None);
        }
        self.skip(self.remaining + self.padding)?;
        self.remaining = 0;
        self.padding = 0;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax_path: Option<Vec<u8>> = None;
        let mut pax_link: Option<Vec<u8>> = None;
        let mut pax_size: Option<u64> = None;
        let mut pending_extension = false;
        let mut block = [0u8; BLOCK];
        loop {
            if !read_block(&mut self.inner, &mut block)? {
                if pending_extension {
                    return Err(TarError::Corrupt(
                        "the tar stream ends after an extension header".into(),
                    ));
                }
                self.done = true;
                return Ok(None);
            }
            if block.iter().all(|&b| b == 0) {
                if pending_extension {
                    return Err(TarError::Corrupt(
                        "an extension header is followed by the end of the archive".into(),
                    ));
                }
                self.after_end = true;
                continue;
            }
            if !checksum_ok(&block)? {
                if self.after_end {
                    // Not another archive: what followed the end marker is ignored, as tar does.
                    tracing::debug!("bytes after the tar end-of-archive marker ignored");
                    self.done = true;
                    return Ok(None);
                }
                return Err(TarError::Corrupt("a tar header has a bad checksum".into()));
            }
            let flag = block[156];
            let size = number(&block[124..136], "size")?;
            let extension = match flag {
                b'L' => Some("GNU long name"),
                b'K' => Some("GNU long link name"),
                b'x' | b'X' => Some("pax extended header"),
                b'g' => Some("pax global header"),
                _ => None,
            };
            if let Some(kind) = extension {
                if size > self.extension_limit {
                    return Err(TarError::ExtensionTooLarge {
                        kind,
                        size,
                        limit: self.extension_limit,
                    });
                }
                let data = self.read_extension(size)?;
                match flag {
                    b'L' => long_name = Some(field(&data).to_vec()),
                    b'K' => long_link = Some(field(&data).to_vec()),
                    b'x' | b'X' => {
                        for (key, value) in pax_records(&data)? {
                            match key {
                                b"path" => pax_path = Some(value.to_vec()),
                                b"linkpath" => pax_link = Some(value.to_vec()),
                                b"size" => {
                                    let text = std::str::from_utf8(value).ok();
                                    pax_size = Some(text.and_then(|t| t.parse().ok()).ok_or_else(
                                        || TarError::Corrupt("pax `size` is not a number".into()),
                                    )?);
                                }
                                _ => {}
                            }
                        }
                    }
                    _ => {} // global records: nothing we use
                }
                pending_extension = flag != b'g' || pending_extension;
                continue;
            }
            let ustar = &block[257..263] == b"ustar\0";
            let mut path = field(&block[0..100]).to_vec();
            if ustar {
                let prefix = field(&block[345..500]);
                if !prefix.is_empty() {
                    let mut full = prefix.to_vec();
                    full.push(b'/');
                    full.extend_from_slice(&path);
                    path = full;
                }
            }
            let path = pax_path.or(long_name).unwrap_or(path);
            let link = pax_link
                .or(long_link)
                .unwrap_or_else(|| field(&block[157..257]).to_vec());
            if path.contains(&0) || link.contains(&0) {
                return Err(TarError::Corrupt(
                    "a tar entry's name holds a NUL byte".into(),
                ));
            }
            let size = pax_size.unwrap_or(size);
            if size > 1 << 62 {
                return Err(TarError::Corrupt(format!("a tar entry of {size} bytes")));
            }
            let kind = EntryKind::of(flag);
            // Links and folders carry no data whatever their size field says, except hard links
            // in pax archives, which may; skip what is declared either way.
            self.remaining = size;
            self.padding = size.next_multiple_of(BLOCK as u64) - size;
            self.after_end = false;
            return Ok(Some(Entry {
                path,
                kind,
                size,
                link,
            }));
        }
    }

    /// Read the current entry's data.
    pub fn read_data(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.remaining) as usize;
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the tar stream ends inside an entry",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header block for `name` of `flag` with `size` bytes of data.
    fn header(name: &[u8], flag: u8, size: u64) -> [u8; BLOCK] {
        let mut b = [0u8; BLOCK];
        b[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
        b[100..108].copy_from_slice(b"0000644\0");
        b[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        b[156] = flag;
        b[257..263].copy_from_slice(b"ustar\0");
        b[263..265].copy_from_slice(b"00");
        b[148..156].copy_from_slice(b"        ");
        let sum: u64 = b.iter().map(|&x| u64::from(x)).sum();
        b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        b
    }

    fn entry(out: &mut Vec<u8>, name: &[u8], flag: u8, data: &[u8]) {
        out.extend_from_slice(&header(name, flag, data.len() as u64));
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(BLOCK), 0);
    }

    fn end(out: &mut Vec<u8>) {
        out.extend_from_slice(&[0u8; 2 * BLOCK]);
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<(Entry, Vec<u8>)>, TarError> {
        let mut reader = TarReader::new(bytes, 64 << 10);
        let mut out = Vec::new();
        while let Some(e) = reader.next_entry()? {
            let mut data = Vec::new();
            let mut buf = [0u8; 100];
            loop {
                let n = reader.read_data(&mut buf)?;
                if n == 0 {
                    break;
                }
                data.extend_from_slice(&buf[..n]);
            }
            out.push((e, data));
        }
        Ok(out)
    }

    #[test]
    fn reads_files_folders_and_gnu_and_pax_names() {
        let mut t = Vec::new();
        entry(&mut t, b"dir/", b'5', b"");
        entry(&mut t, b"dir/a.txt", b'0', b"hello");
        entry(&mut t, b"././@LongLink", b'L', &[b'x'; 300]);
        entry(&mut t, b"short", b'0', b"long");
        let pax = b"19 path=pax/name.t\n";
        entry(&mut t, b"PaxHeader", b'x', pax);
        entry(&mut t, b"ignored", b'0', b"pax");
        end(&mut t);
        let entries = read_all(&t).expect("valid");
        let names: Vec<_> = entries.iter().map(|(e, _)| e.path.clone()).collect();
        assert_eq!(names[0], b"dir/");
        assert_eq!(entries[1].1, b"hello");
        assert_eq!(names[2], vec![b'x'; 300]);
        assert_eq!(entries[2].1, b"long");
        assert_eq!(names[3], b"pax/name.t");
        assert_eq!(entries[3].1, b"pax");
    }

    #[test]
    fn extension_headers_over_the_limit_are_refused_before_they_are_read() {
        // Declares 1.5 GiB of long name, but holds none of it: the reader must refuse on the
        // header alone (reading it would fail with a short stream instead).
        for flag in [b'L', b'K', b'x', b'g'] {
            let mut t = Vec::new();
            t.extend_from_slice(&header(b"././@LongLink", flag, 3 << 29));
            let err = read_all(&t).expect_err("refused");
            assert!(matches!(err, TarError::ExtensionTooLarge { .. }), "{err}");
        }
    }

    #[test]
    fn archives_after_the_end_marker_are_read_and_trailing_zeros_ignored() {
        let mut t = Vec::new();
        entry(&mut t, b"a", b'0', b"1");
        end(&mut t);
        t.extend_from_slice(&[0u8; 10 * BLOCK]);
        entry(&mut t, b"b", b'0', b"2");
        end(&mut t);
        let names: Vec<_> = read_all(&t)
            .expect("valid")
            .into_iter()
            .map(|(e, _)| e.path)
            .collect();
        assert_eq!(names, [b"a".to_vec(), b"b".to_vec()]);
    }

    #[test]
    fn corrupt_streams_are_refused() {
        let mut t = Vec::new();
        entry(&mut t, b"a", b'0', b"data");
        t[148] ^= 1; // checksum
        assert!(matches!(read_all(&t), Err(TarError::Corrupt(_))));
        let mut t = Vec::new();
        entry(&mut t, b"a", b'0', &[1u8; 2000]);
        t.truncate(1000);
        assert!(read_all(&t).is_err(), "ends inside an entry");
        let mut t = Vec::new();
        entry(&mut t, b"PaxHeader", b'x', b"99 path=x\n");
        entry(&mut t, b"a", b'0', b"");
        assert!(
            matches!(read_all(&t), Err(TarError::Corrupt(_))),
            "bad pax length"
        );
    }

    #[test]
    fn numbers_may_be_octal_or_base_256() {
        assert_eq!(number(b"0000644 \0", "x").expect("octal"), 0o644);
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[11] = 5;
        big[10] = 1;
        assert_eq!(number(&big, "x").expect("base-256"), 261);
        assert!(number(b"12x\0", "x").is_err());
    }
}
