//! Cost of the record seal: `cargo bench -p phylax-crypto`.
//! Prints ns per operation and throughput for typical resource sizes.
//! (A plain timing loop: no extra benchmark framework needed for this.)
#![allow(clippy::unwrap_used)]

use phylax_crypto::{DataKey, Kek};
use std::hint::black_box;
use std::time::Instant;

fn time<F: FnMut()>(iters: u32, mut f: F) -> f64 {
    for _ in 0..iters / 10 {
        f();
    }
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    t.elapsed().as_nanos() as f64 / iters as f64
}

fn main() {
    let key = DataKey::generate().unwrap();
    let aad = b"phylax/resource/v1\0Patient\0d9f1c7e2-0000-4000-8000-000000000000\x001\0patient:x";
    println!("| operation | size | ns/op | MB/s |");
    println!("|---|---:|---:|---:|");
    for size in [512usize, 2048, 16 * 1024, 256 * 1024] {
        let plain = vec![b'x'; size];
        let sealed = key.seal(aad, &plain).unwrap();
        let iters = (20_000_000 / size.max(1)).clamp(200, 200_000) as u32;
        let s = time(iters, || {
            black_box(key.seal(aad, black_box(&plain)).unwrap());
        });
        let o = time(iters, || {
            black_box(key.open(aad, black_box(&sealed)).unwrap());
        });
        println!("| seal | {size} | {s:.0} | {:.0} |", size as f64 / s * 1e3);
        println!("| open | {size} | {o:.0} | {:.0} |", size as f64 / o * 1e3);
    }
    let (kek, _) = Kek::generate().unwrap();
    let w = kek.wrap_data_key("patient:x", &key).unwrap();
    let u = time(100_000, || {
        black_box(kek.unwrap_data_key("patient:x", black_box(&w)).unwrap());
    });
    println!("| unwrap data key | 32 | {u:.0} | - |");
}
