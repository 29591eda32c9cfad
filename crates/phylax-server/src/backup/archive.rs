//! The container: a tar stream (the format `tar -x` reads) inside an age
//! stream (the format `age -d` reads). Every entry is hashed as it is
//! written or read; reading refuses paths outside the fixed layout (no
//! absolute paths, no `..`, no links), duplicates, and an age stream that
//! does not authenticate to its last chunk.

use super::manifest::{self, Contents, FileEntry};
use super::{io, BackupError, Progress};
use phylax_crypto::archive::{Identities, Sealing};
use phylax_crypto::kek::Recipients;
use ring::digest::{Context, SHA256};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Files read into memory rather than unpacked (config, certificates,
/// checkpoints, leaves, manifest): at most this large each.
const SMALL: u64 = 256 << 20;

fn now_secs() -> u64 {
    crate::base::clock::now_secs().max(0) as u64
}

/// Hashes what passes through it.
struct Hashing<R> {
    inner: R,
    ctx: Context,
    n: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.ctx.update(&buf[..k]);
        self.n += k as u64;
        Ok(k)
    }
}

fn hex(ctx: Context) -> String {
    hex::encode(ctx.finish().as_ref())
}

/// Writes a backup archive: entries, then the manifest and its signature.
pub struct Writer {
    tar: tar::Builder<Sealing<BufWriter<File>>>,
    files: Vec<FileEntry>,
    /// At most this many bytes a second read from large files.
    max_rate: Option<u64>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Writer({} files)", self.files.len())
    }
}

fn header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(0o600);
    h.set_mtime(now_secs());
    h.set_entry_type(tar::EntryType::Regular);
    h
}

impl Writer {
    pub fn new(out: File, to: &Recipients, max_rate: Option<u64>) -> Result<Writer, BackupError> {
        let sealed = phylax_crypto::archive::seal(to, BufWriter::with_capacity(1 << 20, out))?;
        let mut tar = tar::Builder::new(sealed);
        tar.mode(tar::HeaderMode::Deterministic);
        Ok(Writer {
            tar,
            files: Vec::new(),
            max_rate,
        })
    }

    fn append(&mut self, path: &str, size: u64, data: impl Read) -> Result<FileEntry, BackupError> {
        let mut r = Hashing {
            inner: data,
            ctx: Context::new(&SHA256),
            n: 0,
        };
        self.tar
            .append_data(&mut header(size), path, &mut r)
            .map_err(|e| io(format!("writing {path} into the archive"), e))?;
        if r.n != size {
            return Err(BackupError::Io(format!("{path} changed while it was read")));
        }
        Ok(FileEntry {
            path: path.to_owned(),
            size,
            sha256: hex(r.ctx),
        })
    }

    /// A file listed in the manifest, from memory.
    pub fn add_bytes(&mut self, path: &str, bytes: &[u8]) -> Result<(), BackupError> {
        let e = self.append(path, bytes.len() as u64, bytes)?;
        self.files.push(e);
        Ok(())
    }

    /// A file listed in the manifest, streamed from disk with progress.
    pub fn add_file(
        &mut self,
        path: &str,
        src: &Path,
        progress: Progress,
    ) -> Result<(), BackupError> {
        let f = File::open(src).map_err(|e| io(format!("reading {}", src.display()), e))?;
        let size = f
            .metadata()
            .map_err(|e| io(format!("reading {}", src.display()), e))?
            .len();
        struct Counting<'a, R> {
            inner: R,
            done: u64,
            total: u64,
            step: String,
            progress: Progress<'a>,
            pace: phylax_store::snapshot::Pace,
        }
        impl<R: Read> Read for Counting<'_, R> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let k = self.inner.read(buf)?;
                std::thread::sleep(self.pace.after(k as u64));
                let before = self.done >> 24;
                self.done += k as u64;
                if self.done >> 24 != before || self.done == self.total {
                    (self.progress)(&self.step, self.done, self.total);
                }
                Ok(k)
            }
        }
        let reader = Counting {
            inner: BufReader::with_capacity(1 << 20, f),
            done: 0,
            total: size,
            step: format!("archiving {path}"),
            progress,
            pace: phylax_store::snapshot::Pace::new(self.max_rate),
        };
        let e = self.append(path, size, reader)?;
        self.files.push(e);
        Ok(())
    }

    /// Every file written so far (the manifest lists them).
    pub fn files(&self) -> &[FileEntry] {
        &self.files
    }

    /// The manifest and its signature, last; then the end of the tar and
    /// age streams. Gives back the file, not yet synced.
    pub fn finish(mut self, manifest: &[u8], signature: &str) -> Result<File, BackupError> {
        self.append(manifest::MANIFEST, manifest.len() as u64, manifest)?;
        self.append(
            manifest::SIGNATURE,
            signature.len() as u64,
            signature.as_bytes(),
        )?;
        let sealed = self
            .tar
            .into_inner()
            .map_err(|e| io("finishing the archive", e))?;
        let buf = sealed
            .finish()
            .map_err(|e| io("finishing the archive", e))?;
        buf.into_inner()
            .map_err(|e| io("finishing the archive", e.into_error()))
    }
}

/// Whether `p` is a path a backup may hold, and whether it is small.
fn allowed(p: &str) -> Option<bool> {
    use manifest::*;
    let safe = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    match p {
        MANIFEST | SIGNATURE | LEAVES | CHECKPOINT | OUTSIDE | CONFIG | CHECKPOINT_KEYS | CA
        | CERT | CLIENT_CA | OCSP => Some(true),
        _ => {
            if let Some(db) = p.strip_prefix(DB_DIR) {
                return matches!(db, "phylax.db" | "phylax.pgdump").then_some(false);
            }
            let rest = p.strip_prefix(JOURNAL_DIR)?;
            let (node, file) = rest.split_once('/')?;
            (safe(node) && safe(file)).then_some(false)
        }
    }
}

/// Read a backup to its end. Large files (the database copy, journal
/// files) are written under `unpack` when given, else only hashed; small
/// ones are kept in memory.
pub fn read(
    path: &Path,
    ids: &Identities,
    unpack: Option<&Path>,
    progress: Progress,
) -> Result<Contents, BackupError> {
    let f = File::open(path).map_err(|e| io(format!("reading {}", path.display()), e))?;
    let total = f.metadata().map(|m| m.len()).unwrap_or(0);
    struct Counting<'a, R> {
        inner: R,
        done: u64,
        total: u64,
        progress: Progress<'a>,
    }
    impl<R: Read> Read for Counting<'_, R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let k = self.inner.read(buf)?;
            let before = self.done >> 24;
            self.done += k as u64;
            if self.done >> 24 != before || self.done == self.total {
                (self.progress)("reading the archive", self.done, self.total);
            }
            Ok(k)
        }
    }
    let counted = Counting {
        inner: BufReader::with_capacity(1 << 20, f),
        done: 0,
        total,
        progress,
    };
    let plain = phylax_crypto::archive::open(ids, counted).map_err(|e| match e {
        phylax_crypto::CryptoError::Archive(m) => BackupError::Damaged(m),
        e => e.into(),
    })?;
    let damaged = |e: std::io::Error| BackupError::Damaged(e.to_string());
    let mut tar = tar::Archive::new(plain);
    let mut c = Contents::default();
    for entry in tar.entries().map_err(damaged)? {
        let mut entry = entry.map_err(damaged)?;
        let name = entry
            .path()
            .map_err(damaged)?
            .to_str()
            .map(str::to_owned)
            .ok_or_else(|| BackupError::Invalid("an entry's name is not UTF-8".into()))?;
        let small = allowed(&name)
            .ok_or_else(|| BackupError::Invalid(format!("unexpected entry {name:?}")))?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(BackupError::Invalid(format!(
                "{name} is not a regular file"
            )));
        }
        if c.files.contains_key(&name) || c.small.contains_key(&name) {
            return Err(BackupError::Invalid(format!("{name} appears twice")));
        }
        let size = entry.header().size().map_err(damaged)?;
        if small && size > SMALL {
            return Err(BackupError::Invalid(format!("{name} is too large")));
        }
        let mut h = Hashing {
            inner: &mut entry,
            ctx: Context::new(&SHA256),
            n: 0,
        };
        if small {
            let mut bytes = Vec::with_capacity(size as usize);
            h.read_to_end(&mut bytes).map_err(damaged)?;
            match name.as_str() {
                manifest::MANIFEST => c.manifest_bytes = bytes,
                manifest::SIGNATURE => {
                    c.signature = String::from_utf8(bytes)
                        .map_err(|_| BackupError::Invalid("malformed manifest signature".into()))?
                }
                _ => {
                    c.small.insert(name.clone(), bytes);
                }
            }
        } else {
            match unpack {
                Some(dir) => {
                    let dest: PathBuf = dir.join(&name);
                    if let Some(parent) = dest.parent() {
                        std::fs::create_dir_all(parent)
                            .map_err(|e| io(format!("creating {}", parent.display()), e))?;
                    }
                    let mut out = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&dest)
                        .map_err(|e| io(format!("writing {}", dest.display()), e))?;
                    copy(&mut h, &mut out).map_err(|e| match e {
                        Side::Read(e) => damaged(e),
                        Side::Write(e) => io(format!("writing {}", dest.display()), e),
                    })?;
                    out.sync_all()
                        .map_err(|e| io(format!("syncing {}", dest.display()), e))?;
                }
                None => {
                    std::io::copy(&mut h, &mut std::io::sink()).map_err(damaged)?;
                }
            }
        }
        if h.n != size {
            return Err(BackupError::Damaged(format!("{name} is cut short")));
        }
        if name != manifest::MANIFEST && name != manifest::SIGNATURE {
            c.files.insert(name, (size, hex(h.ctx)));
        }
    }
    // The age stream must end where it says it does (its last chunk is
    // marked and authenticated): anything after the tar's end, or a cut,
    // fails here.
    let mut rest = tar.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink()).map_err(damaged)?;
    Ok(c)
}

enum Side {
    Read(std::io::Error),
    Write(std::io::Error),
}

/// `std::io::copy`, telling a damaged archive (read) from a full disk
/// (write).
fn copy(r: &mut impl Read, w: &mut impl Write) -> Result<u64, Side> {
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0;
    loop {
        let k = match r.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Side::Read(e)),
        };
        w.write_all(&buf[..k]).map_err(Side::Write)?;
        n += k as u64;
    }
}

/// Flush and sync a finished archive file.
pub fn sync(mut f: File) -> Result<(), BackupError> {
    f.flush().map_err(|e| io("writing the archive", e))?;
    f.sync_all().map_err(|e| io("syncing the archive", e))
}
