//! The split copy space as plain data, and a live copy of a guest whose disk
//! is written while it moves (in process, no network).

use super::*;
use crate::local::{live_copy, LocalCopyConfig};
use crate::{SimGuest, SimGuestConfig, Workload};
use std::path::PathBuf;

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ferry-with-disk-{name}-{}", std::process::id()))
}

#[test]
fn a_range_splits_at_the_end_of_memory() {
    assert_eq!(split(100, 10, 5), ((10, 5), (0, 0)));
    assert_eq!(split(100, 98, 5), ((98, 2), (0, 3)));
    assert_eq!(split(100, 100, 5), ((100, 0), (0, 5)));
    assert_eq!(split(100, 130, 2), ((100, 0), (30, 2)));
}

#[test]
fn joined_bitmaps_put_disk_blocks_after_memory_at_any_offset() {
    for memory_pages in [64u64, 100, 127, 1] {
        let mut mem = DirtyBitmap::new(memory_pages);
        let mut disk = DirtyBitmap::new(200);
        mem.set(0);
        mem.set(memory_pages - 1);
        for b in [0, 1, 63, 64, 199] {
            disk.set(b);
        }
        let mut out = DirtyBitmap::new(memory_pages + 200);
        out.set_all();
        join_bitmaps(&mut out, &mem, &disk);
        let mut expected: Vec<u64> = vec![0, memory_pages - 1];
        expected.extend([0, 1, 63, 64, 199].map(|b| memory_pages + b));
        expected.dedup();
        assert_eq!(out.iter().collect::<Vec<_>>(), expected, "{memory_pages}");
        assert_eq!(count_from(&out, memory_pages), 5);
        assert_eq!(count_from(&out, 0), expected.len() as u64);
    }
}

fn sim(memory: u64, rate: u64, incoming: bool) -> Arc<dyn Guest> {
    let mut config = SimGuestConfig::new(memory, Workload::uniform(rate, 9));
    config.prefill_seed = Some(3);
    let guest = if incoming {
        SimGuest::incoming(config)
    } else {
        SimGuest::boot(config)
    };
    guest.unwrap()
}

#[test]
fn pages_and_blocks_cross_the_boundary_in_one_call() {
    let path = scratch("cross");
    let disk = Arc::new(VirtualDisk::create_empty(&path, 1 << 20).unwrap());
    let quiet = DiskWorkload {
        blocks_per_sec: 0,
        prefill_blocks: 0,
        seed: 1,
    };
    let guest =
        GuestWithDisk::new(sim(4 << 20, 0, true), disk, DiskPlacement::Copied, quiet).unwrap();
    let memory_pages = 1024;
    assert_eq!(guest.page_count(), memory_pages + 256);
    assert_eq!(guest.copied_blocks(), 256);
    guest.start_dirty_log().unwrap();
    let data: Vec<u8> = (0..4 * BLOCK_SIZE)
        .map(|i| (i / BLOCK_SIZE + 1) as u8)
        .collect();
    guest.write_pages(memory_pages - 2, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    guest.read_pages(memory_pages - 2, &mut back).unwrap();
    assert_eq!(back, data);
    let mut block = vec![0u8; BLOCK_SIZE];
    guest.disk().read_blocks(1, &mut block).unwrap();
    assert!(
        block.iter().all(|b| *b == 4),
        "the last page landed on disk block 1"
    );
    let mut dirty = DirtyBitmap::new(guest.page_count());
    guest.fetch_and_clear_dirty(&mut dirty).unwrap();
    assert_eq!(count_from(&dirty, memory_pages), 2);
    assert!(dirty.get(memory_pages) && dirty.get(memory_pages + 1));
    guest.zero_pages(memory_pages - 1, 2).unwrap();
    guest.read_pages(memory_pages - 2, &mut back).unwrap();
    assert!(back[BLOCK_SIZE..3 * BLOCK_SIZE].iter().all(|b| *b == 0));
    assert!(guest.write_pages(memory_pages + 255, &data).is_err());
    guest.disk().remove().unwrap();
}

#[test]
fn a_disk_written_while_it_moves_arrives_whole_with_every_acknowledged_record() {
    let (from, to) = (scratch("src"), scratch("dst"));
    let workload = DiskWorkload {
        blocks_per_sec: 4000,
        prefill_blocks: 512,
        seed: 5,
    };
    let (disk, created) = VirtualDisk::open_or_create(&from, 64 << 20).unwrap();
    assert!(created);
    prefill(&disk, &workload).unwrap();
    let src = GuestWithDisk::new(
        sim(8 << 20, 2000, false),
        Arc::new(disk),
        DiskPlacement::Copied,
        workload,
    )
    .unwrap();
    let dst = GuestWithDisk::new(
        sim(8 << 20, 2000, true),
        Arc::new(VirtualDisk::create_empty(&to, 64 << 20).unwrap()),
        DiskPlacement::Copied,
        workload,
    )
    .unwrap();
    let mut acked = Vec::new();
    for i in 0..50 {
        acked.push(src.service_append(format!("r{i}").as_bytes()).unwrap());
    }
    let written = src.disk().blocks_written();
    let report = live_copy(src.as_ref(), dst.as_ref(), &LocalCopyConfig::default()).unwrap();
    let (a, b) = report.digests.unwrap();
    assert_eq!(a, b);
    assert!(
        src.disk().blocks_written() > written,
        "the writer wrote during the move"
    );
    // Paused: the source's disk takes no more writes.
    let after = src.disk().blocks_written();
    assert_eq!(src.service_append(b"late"), Err(ServiceError::Paused));
    assert_eq!(src.disk().blocks_written(), after);
    let on_disk: Vec<u64> = dst.disk().records().unwrap().iter().map(|r| r.0).collect();
    assert_eq!(on_disk, acked);
    // The target continues the log on its own disk.
    let next = dst.service_append(b"after").unwrap();
    assert_eq!(next, acked.len() as u64 + 1);
    assert_eq!(
        dst.disk().records().unwrap().last().map(|r| r.0),
        Some(next)
    );
    src.destroy();
    dst.destroy();
    src.disk().remove().unwrap();
    dst.disk().remove().unwrap();
}

#[test]
fn a_shared_disk_is_not_in_the_copy_space_and_a_fenced_guest_writes_nothing() {
    let path = scratch("shared");
    let (disk, _) = VirtualDisk::open_or_create(&path, 16 << 20).unwrap();
    let guest = GuestWithDisk::new(
        sim(4 << 20, 0, false),
        Arc::new(disk),
        DiskPlacement::Shared,
        DiskWorkload {
            blocks_per_sec: 2000,
            prefill_blocks: 0,
            seed: 2,
        },
    )
    .unwrap();
    assert_eq!(guest.page_count(), 1024);
    assert_eq!(guest.copied_blocks(), 0);
    let lease = RunLease::unlimited();
    guest.bind_lease(lease.clone());
    lease.expire();
    // A batch the writer began before the lease ran out ends under the gate.
    drop(guest.shared.gate());
    let before = guest.disk().blocks_written();
    assert_eq!(guest.service_append(b"x"), Err(ServiceError::Fenced));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(guest.disk().blocks_written(), before);
    guest.destroy();
    guest.disk().remove().unwrap();
}
