//! Reading the spooled output back in chunks.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The largest chunk sent in one log request.
pub const MAX_CHUNK: usize = 1 << 20;

/// Reads up to `max` bytes from `offset`: fewer only at the end of the file.
pub fn read_chunk(file: &File, offset: u64, max: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; max];
    let mut filled = 0;
    while filled < max {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn spool_of(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&data).unwrap();
        (file, data)
    }

    #[test]
    fn reads_from_an_offset_to_the_end() {
        let (file, data) = spool_of(1000);
        let chunk = read_chunk(file.as_file(), 3, MAX_CHUNK).unwrap();
        assert_eq!(chunk, data[3..]);
        assert!(read_chunk(file.as_file(), 1000, MAX_CHUNK).unwrap().is_empty());
        assert!(read_chunk(file.as_file(), 5000, MAX_CHUNK).unwrap().is_empty());
    }

    #[test]
    fn caps_chunks_at_one_mebibyte() {
        let (file, data) = spool_of(2 * MAX_CHUNK + MAX_CHUNK / 2);
        let first = read_chunk(file.as_file(), 0, MAX_CHUNK).unwrap();
        assert_eq!(first, data[..MAX_CHUNK]);
        let second = read_chunk(file.as_file(), 7, MAX_CHUNK).unwrap();
        assert_eq!(second, data[7..7 + MAX_CHUNK]);
        let last = read_chunk(file.as_file(), 2 * MAX_CHUNK as u64, MAX_CHUNK).unwrap();
        assert_eq!(last, data[2 * MAX_CHUNK..]);
    }
}
