//! Arbitrary bytes through every member decoder (rgb png/jpg, depth png, parts png, kp2d.json,
//! meta.json).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = hcmoco_data::shard::fuzz_member_bytes(data);
});
