//! A writer for the `newc` cpio format, the format the Linux kernel unpacks an
//! initramfs from.
//!
//! Each entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex
//! fields), the NUL-terminated name padded to 4 bytes, then the data padded to
//! 4 bytes; a `TRAILER!!!` entry ends the archive. Times and owners are fixed
//! (0), so the same inputs always give the same bytes: two nodes that build the
//! boot image build the same one.

/// File type bits of `mode`.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// An archive being written.
pub struct Cpio {
    out: Vec<u8>,
    next_ino: u32,
}

impl Default for Cpio {
    fn default() -> Self {
        Self::new()
    }
}

impl Cpio {
    pub fn new() -> Self {
        Cpio {
            out: Vec::new(),
            next_ino: 1,
        }
    }

    /// A directory (`mode` is the permission bits, e.g. `0o755`).
    pub fn dir(&mut self, path: &str, mode: u32) {
        self.entry(path, S_IFDIR | mode, 2, (0, 0), b"");
    }

    /// A regular file holding `data`.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.entry(path, S_IFREG | mode, 1, (0, 0), data);
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes());
    }

    /// A character device node (the kernel creates it while unpacking, so
    /// writing the archive needs no privilege).
    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        self.entry(path, S_IFCHR | mode, 1, (major, minor), b"");
    }

    /// The archive, with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.next_ino = 0;
        self.entry("TRAILER!!!", 0, 1, (0, 0), b"");
        self.out
    }

    fn entry(&mut self, path: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        let ino = self.next_ino;
        self.next_ino += 1;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            data.len() as u32,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            path.len() as u32 + 1,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(path.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry read back: (name, mode, rdev, data).
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    fn entries(mut bytes: &[u8]) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut offset = 0usize;
        loop {
            assert_eq!(&bytes[..6], b"070701", "magic at offset {offset}");
            let field = |i: usize| {
                let text = std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i]).unwrap();
                u32::from_str_radix(text, 16).unwrap() as usize
            };
            let (mode, size, namesize) = (field(1), field(6), field(11));
            let rdev = (field(9) as u32, field(10) as u32);
            let name_end = 110 + namesize;
            let name = std::str::from_utf8(&bytes[110..name_end - 1])
                .unwrap()
                .to_string();
            assert_eq!(bytes[name_end - 1], 0);
            let data_start = name_end.next_multiple_of(4);
            let data = bytes[data_start..data_start + size].to_vec();
            let next = (data_start + size).next_multiple_of(4);
            offset += next;
            bytes = &bytes[next..];
            if name == "TRAILER!!!" {
                assert!(bytes.is_empty());
                return out;
            }
            out.push((name, mode as u32, rdev, data));
        }
    }

    #[test]
    fn entries_read_back_with_their_types_and_data() {
        let mut cpio = Cpio::new();
        cpio.dir("bin", 0o755);
        cpio.file("init", 0o755, b"#!/bin/sh\n");
        cpio.symlink("bin/sh", "busybox");
        cpio.char_device("dev/console", 0o600, 5, 1);
        let bytes = cpio.finish();
        assert_eq!(bytes.len() % 4, 0);
        let got = entries(&bytes);
        assert_eq!(
            got,
            vec![
                ("bin".into(), 0o040755, (0, 0), vec![]),
                ("init".into(), 0o100755, (0, 0), b"#!/bin/sh\n".to_vec()),
                ("bin/sh".into(), 0o120777, (0, 0), b"busybox".to_vec()),
                ("dev/console".into(), 0o020600, (5, 1), vec![]),
            ]
        );
    }

    #[test]
    fn the_same_inputs_give_the_same_bytes() {
        let build = || {
            let mut cpio = Cpio::new();
            cpio.file("a", 0o644, b"xyz");
            cpio.finish()
        };
        assert_eq!(build(), build());
        // Header: magic + 13 fields, then "a\0" padded to 4 (110 + 2 -> 112).
        let bytes = build();
        assert_eq!(&bytes[..14], b"07070100000001");
        assert_eq!(&bytes[110..112], b"a\0");
        assert_eq!(&bytes[112..115], b"xyz");
    }
}
