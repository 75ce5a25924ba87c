//! Arbitrary bytes as a shard file: open (tar header scan), then read and decode every sample.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = hcmoco_data::shard::fuzz_shard_bytes(data);
});
