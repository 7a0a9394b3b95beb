//! The decoder against RFC 7541's own examples (Appendix C), the Huffman code against the
//! Appendix B codes and `loona-hpack`'s decoder, every error of §5 and §6, and a property test
//! against `loona-hpack` on random blocks.

use proptest::prelude::*;

use super::super::hpack::put_int;
use super::*;

type Fields = Vec<(String, String)>;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn decode(d: &mut Decoder, block: &[u8]) -> Result<Fields, DecodeError> {
    let mut out = Vec::new();
    d.decode_with_cb(block, |n, v, _| {
        out.push((
            String::from_utf8_lossy(n).into_owned(),
            String::from_utf8_lossy(v).into_owned(),
        ))
    })?;
    Ok(out)
}

fn fields(list: &[(&str, &str)]) -> Fields {
    list.iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

/// A test-only Huffman encoder from the same code (padding: EOS's leading ones).
fn huffman_encode(s: &[u8]) -> Vec<u8> {
    let codes = huffman_code();
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u64, 0u32);
    for &b in s {
        let (code, len) = codes[usize::from(b)];
        acc = (acc << len) | u64::from(code);
        bits += u32::from(len);
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if bits > 0 {
        out.push(((acc << (8 - bits)) as u8) | (0xff >> bits));
    }
    out
}

fn put_string(out: &mut Vec<u8>, s: &[u8], huffman: bool) {
    if huffman {
        let h = huffman_encode(s);
        put_int(out, h.len(), 7, 0x80);
        out.extend_from_slice(&h);
    } else {
        put_int(out, s.len(), 7, 0);
        out.extend_from_slice(s);
    }
}

/// Appendix C.2: each representation alone, on a new decoder.
#[test]
fn rfc7541_c2_field_representations() {
    let cases: [(&str, (&str, &str), usize); 4] = [
        (
            "400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572",
            ("custom-key", "custom-header"),
            55,
        ),
        (
            "040c 2f73 616d 706c 652f 7061 7468",
            (":path", "/sample/path"),
            0,
        ),
        (
            "1008 7061 7373 776f 7264 0673 6563 7265 74",
            ("password", "secret"),
            0,
        ),
        ("82", (":method", "GET"), 0),
    ];
    for (block, field, size) in cases {
        let mut d = Decoder::new(4096);
        let mut never = Vec::new();
        let mut got = Vec::new();
        d.decode_with_cb(&hex(block), |n, v, s| {
            got.push((n.to_vec(), v.to_vec()));
            never.push(s);
        })
        .unwrap();
        assert_eq!(
            got,
            [(field.0.as_bytes().to_vec(), field.1.as_bytes().to_vec())]
        );
        assert_eq!(d.table().1, size, "{block}");
        // Only C.2.3 is never indexed.
        assert_eq!(never, [field.0 == "password"]);
    }
}

/// The three requests of C.3 (raw strings) or C.4 (Huffman-coded), on one decoder.
fn requests(blocks: [&str; 3]) {
    let mut d = Decoder::new(4096);
    let first = [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
    ];
    assert_eq!(decode(&mut d, &hex(blocks[0])).unwrap(), fields(&first));
    assert_eq!(
        d.table(),
        (fields(&[(":authority", "www.example.com")]), 57)
    );
    let mut second = first.to_vec();
    second.push(("cache-control", "no-cache"));
    assert_eq!(decode(&mut d, &hex(blocks[1])).unwrap(), fields(&second));
    assert_eq!(
        d.table(),
        (
            fields(&[
                ("cache-control", "no-cache"),
                (":authority", "www.example.com")
            ]),
            110
        )
    );
    let third = [
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/index.html"),
        (":authority", "www.example.com"),
        ("custom-key", "custom-value"),
    ];
    assert_eq!(decode(&mut d, &hex(blocks[2])).unwrap(), fields(&third));
    assert_eq!(
        d.table(),
        (
            fields(&[
                ("custom-key", "custom-value"),
                ("cache-control", "no-cache"),
                (":authority", "www.example.com"),
            ]),
            164
        )
    );
}

#[test]
fn rfc7541_c3_requests_without_huffman() {
    requests([
        "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
        "8286 84be 5808 6e6f 2d63 6163 6865",
        "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
    ]);
}

#[test]
fn rfc7541_c4_requests_with_huffman() {
    requests([
        "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
        "8286 84be 5886 a8eb 1064 9cbf",
        "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
    ]);
}

/// The three responses of C.5 (raw) or C.6 (Huffman-coded), on one decoder whose table is
/// 256 bytes: entries are evicted.
fn responses(blocks: [&str; 3]) {
    let mut d = Decoder::new(256);
    let date1 = "Mon, 21 Oct 2013 20:13:21 GMT";
    let date2 = "Mon, 21 Oct 2013 20:13:22 GMT";
    let location = "https://www.example.com";
    let cookie = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1";
    let first = [
        (":status", "302"),
        ("cache-control", "private"),
        ("date", date1),
        ("location", location),
    ];
    assert_eq!(decode(&mut d, &hex(blocks[0])).unwrap(), fields(&first));
    let mut table: Vec<_> = first.iter().rev().copied().collect();
    assert_eq!(d.table(), (fields(&table), 222));
    let mut second = first;
    second[0] = (":status", "307");
    assert_eq!(decode(&mut d, &hex(blocks[1])).unwrap(), fields(&second));
    // `:status: 302` went for `:status: 307`.
    table.pop();
    table.insert(0, (":status", "307"));
    assert_eq!(d.table(), (fields(&table), 222));
    let third = [
        (":status", "200"),
        ("cache-control", "private"),
        ("date", date2),
        ("location", location),
        ("content-encoding", "gzip"),
        ("set-cookie", cookie),
    ];
    assert_eq!(decode(&mut d, &hex(blocks[2])).unwrap(), fields(&third));
    assert_eq!(
        d.table(),
        (
            fields(&[
                ("set-cookie", cookie),
                ("content-encoding", "gzip"),
                ("date", date2)
            ]),
            215
        )
    );
}

#[test]
fn rfc7541_c5_responses_without_huffman() {
    responses([
        "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 \
         2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 \
         6c65 2e63 6f6d",
        "4803 3330 37c1 c0bf",
        "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d \
         54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 \
         5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e \
         3d31",
    ]);
}

#[test]
fn rfc7541_c6_responses_with_huffman() {
    responses([
        "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 \
         2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
        "4883 640e ffc1 c0bf",
        "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab \
         77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f \
         9587 3160 65c0 03ed 4ee5 b106 3d50 07",
    ]);
}

/// Codes of Appendix B, first, last, shortest and longest: the canonical rebuild gives them.
#[test]
fn huffman_codes_are_the_appendix_b_codes() {
    let codes = huffman_code();
    assert_eq!(codes[0], (0x1ff8, 13));
    assert_eq!(codes[1], (0x7fffd8, 23));
    assert_eq!(codes[10], (0x3ffffffc, 30));
    assert_eq!(codes[usize::from(b' ')], (0x14, 6));
    assert_eq!(codes[usize::from(b'0')], (0x0, 5));
    assert_eq!(codes[usize::from(b'a')], (0x3, 5));
    assert_eq!(codes[usize::from(b't')], (0x9, 5));
    assert_eq!(codes[usize::from(b'z')], (0x7b, 7));
    assert_eq!(codes[255], (0x3ffffee, 26));
    assert_eq!(codes[EOS], (0x3fffffff, 30));
}

fn huffman_decoded(src: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    huffman_decode(src, &mut out).map(|()| out)
}

/// Every byte alone and all of them in one string, through our encoder and back, and through
/// `loona-hpack`'s decoder (whose table is its own).
#[test]
fn every_byte_round_trips_through_huffman() {
    let mut loona = loona_hpack::Decoder::new();
    let mut all = Vec::new();
    for b in 0..=255u8 {
        all.push(b);
        let coded = huffman_encode(&[b]);
        assert_eq!(huffman_decoded(&coded).unwrap(), [b], "byte {b}");
        // `x: <b>` as a literal without indexing, the value Huffman-coded.
        let mut block = vec![0x00, 0x01, b'x'];
        put_string(&mut block, &[b], true);
        assert_eq!(loona.decode(&block).unwrap()[0].1, [b], "byte {b}");
    }
    assert_eq!(huffman_decoded(&huffman_encode(&all)).unwrap(), all);
    assert_eq!(huffman_decoded(&[]).unwrap(), b"");
}

#[test]
fn bad_huffman_padding_and_eos_are_refused() {
    // "a" is 00011: padding 111 is right, 000 or 101 is not.
    assert_eq!(huffman_decoded(&[0x1f]).unwrap(), b"a");
    assert_eq!(huffman_decoded(&[0x18]), Err(DecodeError::HuffmanPadding));
    assert_eq!(huffman_decoded(&[0x1d]), Err(DecodeError::HuffmanPadding));
    // "a" then a whole byte of ones: 11 bits of padding.
    assert_eq!(
        huffman_decoded(&[0x1f, 0xff]),
        Err(DecodeError::HuffmanPadding)
    );
    // A lone byte of ones: 8 bits of padding.
    assert_eq!(huffman_decoded(&[0xff]), Err(DecodeError::HuffmanPadding));
    // EOS (30 ones) then two more.
    assert_eq!(huffman_decoded(&[0xff; 4]), Err(DecodeError::HuffmanEos));
    // "a" then EOS: 00011 + 30 ones + 5 ones of padding.
    assert_eq!(
        huffman_decoded(&[0x1f, 0xff, 0xff, 0xff, 0xff]),
        Err(DecodeError::HuffmanEos)
    );
    // In a block, a padding error is the block's error.
    let mut d = Decoder::new(4096);
    assert_eq!(
        decode(&mut d, &[0x04, 0x81, 0x18]),
        Err(DecodeError::HuffmanPadding)
    );
}

/// Appendix C.1's integers: 10 with a 5-bit prefix, 1337 with a 5-bit prefix (`1f 9a 0a`),
/// 42 on a byte boundary (an 8-bit prefix); read by `integer`, written by the encoder's
/// `put_int`, and 10 and 1337 as size updates (`2a`, `3f 9a 0a`) through the decoder.
#[test]
fn rfc7541_c1_integers() {
    for (value, prefix, bytes) in [
        (10, 5, &[0x0a][..]),
        (1337, 5, &[0x1f, 0x9a, 0x0a]),
        (42, 8, &[0x2a]),
    ] {
        assert_eq!(
            integer(bytes, 0, prefix),
            Ok((value, bytes.len())),
            "{value}"
        );
        let mut out = Vec::new();
        put_int(&mut out, value, prefix, 0);
        assert_eq!(out, bytes, "{value}");
    }
    let mut d = Decoder::new(4096);
    assert_eq!(decode(&mut d, &[0x2a]), Ok(vec![]));
    assert_eq!(d.table.max, 10);
    assert_eq!(decode(&mut d, &[0x3f, 0x9a, 0x0a]), Ok(vec![]));
    assert_eq!(d.table.max, 1337);
}

#[test]
fn bad_integers_and_indexes_are_refused() {
    let mut d = Decoder::new(4096);
    // Index 0.
    assert_eq!(decode(&mut d, &[0x80]), Err(DecodeError::IndexZero));
    // Past the static table with an empty dynamic table: indexed, and as a literal's name.
    assert_eq!(
        decode(&mut d, &[0xbe]),
        Err(DecodeError::IndexOutOfRange(62))
    );
    assert_eq!(
        decode(&mut d, &[0x0f, 0x2f, 0x00]),
        Err(DecodeError::IndexOutOfRange(62))
    );
    // The prefix and 5 continuation bytes: too long; the prefix and 4 is read (and out of
    // range).
    assert_eq!(
        decode(&mut d, &[0xff, 0x80, 0x80, 0x80, 0x80, 0x01]),
        Err(DecodeError::IntegerTooLong)
    );
    assert_eq!(
        decode(&mut d, &[0xff, 0x80, 0x80, 0x80, 0x01]),
        Err(DecodeError::IndexOutOfRange(127 + (1 << 21)))
    );
    // Ends inside an integer, a string's length, a string.
    assert_eq!(decode(&mut d, &[0xff, 0x80]), Err(DecodeError::Truncated));
    assert_eq!(decode(&mut d, &[0x04]), Err(DecodeError::Truncated));
    assert_eq!(
        decode(&mut d, &[0x04, 0x02, b'/']),
        Err(DecodeError::Truncated)
    );
    assert_eq!(decode(&mut d, &[0x00, 0x01]), Err(DecodeError::Truncated));
    // A string's length of nearly 2^28.
    assert_eq!(
        decode(&mut d, &[0x04, 0x7f, 0xff, 0xff, 0xff, 0x7f]),
        Err(DecodeError::Truncated)
    );
    // Index 62 once the dynamic table holds one entry, 63 still not.
    let mut d = Decoder::new(4096);
    let mut block = vec![0x40];
    put_string(&mut block, b"x-a", false);
    put_string(&mut block, b"1", true);
    block.push(0xbe);
    assert_eq!(
        decode(&mut d, &block).unwrap(),
        fields(&[("x-a", "1"), ("x-a", "1")])
    );
    assert_eq!(
        decode(&mut d, &[0xbf]),
        Err(DecodeError::IndexOutOfRange(63))
    );
}

#[test]
fn size_updates_only_at_the_start_and_never_above_the_max() {
    let mut d = Decoder::new(4096);
    // 4097 (31 + 98 + 31·128), then 4096.
    assert_eq!(
        decode(&mut d, &[0x3f, 0xe2, 0x1f]),
        Err(DecodeError::SizeUpdateTooLarge {
            size: 4097,
            max: 4096
        })
    );
    let mut d = Decoder::new(4096);
    assert_eq!(decode(&mut d, &[0x3f, 0xe1, 0x1f, 0x82]).unwrap().len(), 1);
    assert_eq!(
        decode(&mut d, &[0x82, 0x20]),
        Err(DecodeError::SizeUpdateAfterField)
    );
    // Two at the start (to 0, then back up), and a block of only an update, are fine.
    let mut d = Decoder::new(4096);
    let mut block = vec![0x40];
    put_string(&mut block, b"x-a", false);
    put_string(&mut block, b"1", false);
    decode(&mut d, &block).unwrap();
    assert_eq!(d.table().1, 36);
    assert_eq!(
        decode(&mut d, &[0x20, 0x3f, 0xe1, 0x1f, 0x82])
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        d.table(),
        (vec![], 0),
        "a size update to 0 empties the table"
    );
    assert_eq!(decode(&mut d, &[0x3f, 0x11]).unwrap(), vec![]);
    // A table of 48 bytes: a 36-byte entry fits, a second evicts the first.
    decode(&mut d, &block).unwrap();
    decode(&mut d, &block).unwrap();
    assert_eq!(d.table(), (fields(&[("x-a", "1")]), 36));
    assert_eq!(d.table.max, 48);
}

/// An entry larger than the table empties it (§4.4), with no error, and its field is still
/// passed on; a literal's name may be the entry being evicted.
#[test]
fn an_entry_larger_than_the_table_empties_it() {
    let mut d = Decoder::new(64);
    let mut block = vec![0x40];
    put_string(&mut block, b"x-a", false);
    put_string(&mut block, b"1", false);
    decode(&mut d, &block).unwrap();
    assert_eq!(d.table().1, 36);
    // Named by index 62 (`x-a`, the entry it evicts): 3 + 29 + 32 = 64 fits exactly.
    let mut block = vec![0x7e];
    put_string(&mut block, &[b'v'; 29], true);
    let got = decode(&mut d, &block).unwrap();
    assert_eq!(got, fields(&[("x-a", &"v".repeat(29))]));
    assert_eq!(d.table(), (got.clone(), 64));
    // 3 + 30 + 32 = 65: nothing left.
    let mut block = vec![0x7e];
    put_string(&mut block, &[b'w'; 30], false);
    assert_eq!(decode(&mut d, &block).unwrap()[0].1, "w".repeat(30));
    assert_eq!(d.table(), (vec![], 0));
}

/// Raw strings come borrowed from the block; Huffman-coded ones from one scratch buffer,
/// kept between blocks up to [`SCRATCH_KEPT`] and freed after a block that needed more.
#[test]
fn strings_are_borrowed_or_decoded_into_one_kept_scratch() {
    let mut d = Decoder::new(4096);
    let mut block = vec![0x04];
    put_string(&mut block, b"/raw", false);
    let mut at = None;
    d.decode_with_cb(&block, |_, v, _| at = Some(v.as_ptr()))
        .unwrap();
    assert_eq!(at, Some(block[2..].as_ptr()));
    let mut block = vec![0x00];
    put_string(&mut block, b"x-name", true);
    put_string(&mut block, b"/hello", true);
    let mut seen = Vec::new();
    for _ in 0..3 {
        d.decode_with_cb(&block, |n, v, _| {
            assert_eq!((n, v), (&b"x-name"[..], &b"/hello"[..]));
            seen.push(n.as_ptr());
        })
        .unwrap();
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "a new scratch");
    let cap = d.scratch.capacity();
    assert!((1..=SCRATCH_KEPT).contains(&cap));
    let mut big = vec![0x00, 0x01, b'x'];
    put_string(&mut big, &[b'a'; 8000], true);
    assert_eq!(decode(&mut d, &big).unwrap()[0].1.len(), 8000);
    assert_eq!(d.scratch.capacity(), 0, "a large scratch is kept");
}

/// 16 KiB of 1-byte Huffman-coded values in one block decode without a buffer per string.
#[test]
fn many_tiny_huffman_strings_share_the_scratch() {
    let mut d = Decoder::new(4096);
    let mut block = Vec::new();
    while block.len() < 16_384 {
        block.extend_from_slice(&[0x0f, 0x04, 0x81, 0x1f]); // accept: "a"
    }
    let mut n = 0;
    let mut first = None;
    d.decode_with_cb(&block, |name, v, _| {
        assert_eq!((name, v), (&b"accept"[..], &b"a"[..]));
        // Every value at the scratch's start: one buffer for all.
        assert_eq!(*first.get_or_insert(v.as_ptr()), v.as_ptr());
        n += 1;
    })
    .unwrap();
    assert_eq!(n, 4096);
}

/// One representation of a generated block.
#[derive(Debug, Clone)]
enum Op {
    Indexed(usize),
    Literal {
        /// 0x40 with indexing, 0x00 without, 0x10 never indexed.
        kind: u8,
        name_index: usize,
        name: Vec<u8>,
        value: Vec<u8>,
        huffman: (bool, bool),
    },
    SizeUpdate(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let bytes = || {
        prop_oneof![
            proptest::collection::vec(b'a'..=b'z', 0..12),
            proptest::collection::vec(any::<u8>(), 0..40),
        ]
    };
    prop_oneof![
        4 => (1usize..75).prop_map(Op::Indexed),
        6 => (
            prop_oneof![Just(0x40u8), Just(0x00), Just(0x10)],
            prop_oneof![Just(0usize), 1usize..75],
            bytes(),
            bytes(),
            any::<(bool, bool)>()
        )
            .prop_map(|(kind, name_index, name, value, huffman)| Op::Literal {
                kind,
                name_index,
                name,
                value,
                huffman
            }),
        1 => (0usize..4200).prop_map(Op::SizeUpdate),
    ]
}

fn encode(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::new();
    for op in ops {
        match op {
            Op::Indexed(i) => put_int(&mut out, *i, 7, 0x80),
            Op::SizeUpdate(s) => put_int(&mut out, *s, 5, 0x20),
            Op::Literal {
                kind,
                name_index,
                name,
                value,
                huffman,
            } => {
                put_int(
                    &mut out,
                    *name_index,
                    if *kind == 0x40 { 6 } else { 4 },
                    *kind,
                );
                if *name_index == 0 {
                    put_string(&mut out, name, huffman.0);
                }
                put_string(&mut out, value, huffman.1);
            }
        }
    }
    out
}

type Outcome = Result<Vec<(Vec<u8>, Vec<u8>)>, ()>;

/// Both decoders over the same blocks, in order, until one refuses one: they agree on each
/// block, but where `loona-hpack` is wrong. It takes a size update after a field (§4.2 says
/// only at the block's start) and refuses a block that ends with a size update (legal,
/// e.g. a block of only an update).
fn agree(blocks: &[Vec<u8>]) -> Result<(), TestCaseError> {
    let mut ours = Decoder::new(4096);
    let mut loona = loona_hpack::Decoder::new();
    loona.set_max_allowed_table_size(4096);
    for block in blocks {
        let mut got = Vec::new();
        let a: Result<_, DecodeError> = ours
            .decode_with_cb(block, |n, v, _| got.push((n.to_vec(), v.to_vec())))
            .map(|()| got);
        let b = loona.decode(block);
        let refused = a.is_err() || b.is_err();
        match (&a, &b) {
            (Err(DecodeError::SizeUpdateAfterField), Ok(_)) => return Ok(()),
            (Ok(_), Err(loona_hpack::decoder::DecoderError::SizeUpdateAtEnd)) => {}
            _ => {
                let a: Outcome = a.map_err(|_| ());
                let b: Outcome = b.map_err(|_| ());
                prop_assert_eq!(&a, &b, "block {:02x?}", block);
            }
        }
        if refused {
            return Ok(());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn huffman_round_trips(s in proptest::collection::vec(any::<u8>(), 0..200)) {
        prop_assert_eq!(huffman_decoded(&huffman_encode(&s)).unwrap(), s);
    }

    /// Blocks of every representation (Huffman or raw strings, size updates anywhere, indexes
    /// in and past the tables), several on one connection.
    #[test]
    fn agrees_with_loona_on_generated_blocks(
        blocks in proptest::collection::vec(proptest::collection::vec(op(), 0..12), 1..6)
    ) {
        let blocks: Vec<_> = blocks.iter().map(|ops| encode(ops)).collect();
        agree(&blocks)?;
    }

    #[test]
    fn agrees_with_loona_on_random_bytes(
        blocks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..4)
    ) {
        agree(&blocks)?;
    }

    /// What `loona-hpack`'s encoder (dynamic table, raw strings) sends decodes to what it
    /// was given.
    #[test]
    fn decodes_loona_encoder_blocks(
        lists in proptest::collection::vec(
            proptest::collection::vec(
                (
                    prop_oneof![
                        Just(b":path".to_vec()),
                        Just(b"accept".to_vec()),
                        Just(b"x-custom".to_vec()),
                        proptest::collection::vec(b'a'..=b'z', 1..10),
                    ],
                    proptest::collection::vec(any::<u8>(), 0..300),
                ),
                0..10,
            ),
            1..8,
        )
    ) {
        let mut enc = loona_hpack::Encoder::new();
        let mut ours = Decoder::new(4096);
        for list in lists {
            let block = enc.encode(list.iter().map(|(n, v)| (&n[..], &v[..])));
            let mut got = Vec::new();
            ours.decode_with_cb(&block, |n, v, _| got.push((n.to_vec(), v.to_vec())))
                .unwrap();
            prop_assert_eq!(got, list);
        }
    }
}

/// A name taken from the dynamic table costs no copy of it: one 100-byte literal name, then
/// `7e 00` (incremental indexing, name = index 62, empty value) 20 times: all 21 entries fit
/// the table at once and name one allocation (copying the name per insert would give 21, and
/// `7e 00` after one 4000-byte name would copy 4000 bytes per 2 bytes of block); a name from
/// the static table is the static table's own.
#[test]
fn a_name_from_a_table_is_shared_not_copied() {
    // A `len`-byte literal name with an empty value, indexed, then `repeats` × `7e 00`.
    let block = |len: usize, repeats: usize| {
        let mut block = vec![0x40];
        put_int(&mut block, len, 7, 0);
        block.extend(std::iter::repeat_n(b'x', len));
        block.push(0x00);
        for _ in 0..repeats {
            block.extend_from_slice(&[0x7e, 0x00]);
        }
        block
    };
    let mut d = Decoder::new(4096);
    let mut n = 0;
    d.decode_with_cb(&block(100, 20), |name, value, _| {
        assert_eq!((name.len(), value.len()), (100, 0));
        n += 1;
    })
    .unwrap();
    assert_eq!(n, 21);
    let (entries, size) = d.table();
    assert_eq!((entries.len(), size), (21, 21 * 132));
    let at = d.name_addresses();
    assert!(at.iter().all(|&a| a == at[0]), "{at:?}");
    assert!(d.static_names().iter().all(|&s| !s));
    // `:authority` (static index 1) with incremental indexing: a static name, not a copy (its
    // address is no test: a constant's string may be emitted once per codegen unit).
    d.decode_with_cb(&[0x41, 0x01, b'a'], |_, _, _| {}).unwrap();
    assert_eq!(d.static_names()[..2], [true, false]);
    // And the long case decodes to one entry of its size.
    let mut d = Decoder::new(4096);
    d.decode_with_cb(&block(4000, 5000), |_, _, _| {}).unwrap();
    assert_eq!(d.table().1, 4032);
}
