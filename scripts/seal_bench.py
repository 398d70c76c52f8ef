#!/usr/bin/env python3
"""CKKS micro-benchmark of Microsoft SEAL (through TenSEAL), single thread.

    target/venv-seal/bin/python scripts/seal_bench.py --n 32768
    target/venv-seal/bin/python scripts/seal_bench.py --n 16384 --coeff-bits 60,40,40,40,40,40,40,60

Install the venv first: bash scripts/setup-seal.sh

Prints one JSON object on stdout:
  {"library": "SEAL via TenSEAL <v>", "n", "coeff_bits", "limbs", "log_q", ...,
   "ops_ms": {...}, "tenseal_ops_ms": {...}, "sizes_bytes": {...}, "notes": {...}}

"ops_ms" are SEAL's own operations called one by one through tenseal.sealapi (the
pybind11 binding of SEAL's C++ API), so each figure is one well-defined step;
they use the same keys as `beaa bench ckks --json`. "tenseal_ops_ms" are the same
tasks through TenSEAL's CKKSVector API (what a TenSEAL user sees: extra copies,
automatic relinearization/rescale, Python list conversion). "notes" says what
every figure includes. Every figure is the median over --reps runs (after one
warm-up run); keygen figures use --keygen-reps. "*_ms" are wall-clock times,
"*_cpu_ms" the CPU time of this process for the same runs (robust to other
load on the machine; equal to wall time on an idle machine, all single-threaded).

SEAL reserves the LAST prime of coeff_bits as the key-switching ("special")
prime: fresh ciphertexts have len(coeff_bits)-1 limbs, keys have all of them.
"""
import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

# Defaults per N: within the 128-bit-security bound on log2(Q*P) of the
# HomomorphicEncryption.org standard that SEAL enforces (218 / 438 / 881 bits).
DEFAULT_COEFF_BITS = {
    4096: [40, 20, 40],
    8192: [60, 40, 40, 60],
    16384: [60, 40, 40, 40, 40, 40, 40, 60],
    32768: [60] + [40] * 15 + [60],
}
MAX_LOG_Q_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, required=True, help="ring degree N (8192, 16384, 32768)")
    p.add_argument("--coeff-bits", type=str, default=None,
                   help="comma-separated prime sizes, last one is SEAL's special prime "
                        "(default per N: %s)" % {k: v for k, v in DEFAULT_COEFF_BITS.items()})
    p.add_argument("--scale-bits", type=int, default=None,
                   help="log2 of the encoding scale (default: the size of the middle primes)")
    p.add_argument("--reps", type=int, default=None, help="runs per op (default: 21 for N<=16384, 11 above)")
    p.add_argument("--keygen-reps", type=int, default=None, help="runs of keygen (default: 5)")
    p.add_argument("--no-tenseal-ops", action="store_true", help="skip the TenSEAL-API figures")
    p.add_argument("--allow-insecure", action="store_true", help="allow log2 Q above the 128-bit bound")
    return p.parse_args()


def median_ms(fn, reps, setup=None):
    """(median wall ms, median process-CPU ms) of fn(state) over reps runs.

    setup() (untimed) makes a fresh state for each run. The CPU figure is what this
    process itself spent, so it is less disturbed by other load on the machine.
    """
    wall, cpu = [], []
    for i in range(reps + 1):  # first run is a warm-up
        state = setup() if setup else None
        c0 = time.process_time_ns()
        t0 = time.perf_counter_ns()
        fn(state)
        t1 = time.perf_counter_ns()
        c1 = time.process_time_ns()
        if i > 0:
            wall.append((t1 - t0) / 1e6)
            cpu.append((c1 - c0) / 1e6)
    return round(statistics.median(wall), 4), round(statistics.median(cpu), 4)


def seal_header(save):
    """(version 'major.minor', compression mode name) from SEAL's serialization header."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "obj")
        save(path)
        with open(path, "rb") as f:
            h = f.read(8)
    if len(h) < 6 or h[0:2] != bytes([0x5E, 0xA1]):
        return "?", "?"
    return f"{h[3]}.{h[4]}", {0: "none", 1: "zlib", 2: "zstd"}.get(h[5], str(h[5]))


def file_size(save, suffix):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "obj" + suffix)
        save(path)
        return os.path.getsize(path)


def main():
    args = parse_args()
    try:
        import tenseal as ts
        import tenseal.sealapi as sealapi
    except ImportError:
        sys.exit("seal_bench.py: tenseal is not installed in this python; run: bash scripts/setup-seal.sh "
                 "and use target/venv-seal/bin/python")

    n = args.n
    if args.coeff_bits:
        coeff_bits = [int(x) for x in args.coeff_bits.replace(" ", "").strip("[]").split(",") if x]
    elif n in DEFAULT_COEFF_BITS:
        coeff_bits = DEFAULT_COEFF_BITS[n]
    else:
        sys.exit(f"seal_bench.py: no default --coeff-bits for n={n}")
    log_qp = sum(coeff_bits)
    bound = MAX_LOG_Q_128.get(n)
    if bound is not None and log_qp > bound and not args.allow_insecure:
        sys.exit(f"seal_bench.py: log2(QP)={log_qp} exceeds the 128-bit bound {bound} for n={n}")
    if len(coeff_bits) < 3:
        sys.exit("seal_bench.py: need at least 3 primes (data, one rescale level, special)")
    scale_bits = args.scale_bits or coeff_bits[1]
    scale = 2.0 ** scale_bits
    reps = args.reps or (21 if n <= 16384 else 11)
    keygen_reps = args.keygen_reps or 5
    slots = n // 2

    rng = random.Random(1)
    values_a = [rng.uniform(-1, 1) for _ in range(slots)]
    values_b = [rng.uniform(-1, 1) for _ in range(slots)]
    scalar = 0.7315

    ops, ops_cpu = {}, {}
    ts_ops, ts_ops_cpu = {}, {}
    notes = {}
    sizes = {}

    # ------------------------------------------------------------------ raw SEAL
    parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(n)
    parms.set_coeff_modulus(sealapi.CoeffModulus.Create(n, coeff_bits))
    sec = sealapi.SEC_LEVEL_TYPE.TC128 if not args.allow_insecure else sealapi.SEC_LEVEL_TYPE.NONE
    ctx = sealapi.SEALContext(parms, True, sec)
    if not ctx.parameters_set():
        sys.exit(f"seal_bench.py: SEAL rejected the parameters: {ctx.parameters_error_message()}")

    def keygen(_):
        kg = sealapi.KeyGenerator(ctx)
        pk = sealapi.PublicKey()
        kg.create_public_key(pk)
        rk = sealapi.RelinKeys()
        kg.create_relin_keys(rk)
        return kg, pk, rk

    ops["keygen"], ops_cpu["keygen"] = median_ms(keygen, keygen_reps)
    notes["keygen"] = ("SEAL KeyGenerator(ctx) (samples the secret key) + create_public_key + "
                       "create_relin_keys (full, not seeded); SEALContext creation (prime/NTT tables) excluded")
    kg, pk, rk = keygen(None)
    sk = kg.secret_key()

    def keygen_relin(_):
        out = sealapi.RelinKeys()
        kg.create_relin_keys(out)

    ops["keygen_relin"], ops_cpu["keygen_relin"] = median_ms(keygen_relin, keygen_reps)
    notes["keygen_relin"] = "KeyGenerator.create_relin_keys (full, not seeded) for an existing secret key"
    encoder = sealapi.CKKSEncoder(ctx)
    encryptor = sealapi.Encryptor(ctx, pk, sk)
    decryptor = sealapi.Decryptor(ctx, sk)
    evaluator = sealapi.Evaluator(ctx)

    def encode(vals):
        pt = sealapi.Plaintext()
        encoder.encode(vals, scale, pt)
        return pt

    def encrypt_vals(vals):
        ct = sealapi.Ciphertext(ctx)
        encryptor.encrypt(encode(vals), ct)
        return ct

    def encrypt_vals_sk(vals):
        ct = sealapi.Ciphertext(ctx)
        encryptor.encrypt_symmetric(encode(vals), ct)
        return ct

    ops["encode"], ops_cpu["encode"] = median_ms(lambda _: encode(values_a), reps)
    notes["encode"] = f"CKKSEncoder.encode of {slots} Python floats (N/2 slots) at scale 2^{scale_bits}, incl. list conversion"
    ops["encrypt"], ops_cpu["encrypt"] = median_ms(lambda _: encrypt_vals_sk(values_a), reps)
    notes["encrypt"] = ("encode (as above) + secret-key Encryptor.encrypt_symmetric at the top level (full "
                        "ciphertext in memory; SEAL replaces c1 by its seed only when serializing)")
    ops["encrypt_pk"], ops_cpu["encrypt_pk"] = median_ms(lambda _: encrypt_vals(values_a), reps)
    notes["encrypt_pk"] = "encode (as above) + public-key Encryptor.encrypt at the top level"
    pt_a = encode(values_a)

    def enc_pk_only(_):
        ct = sealapi.Ciphertext(ctx)
        encryptor.encrypt(pt_a, ct)

    def enc_sk_only(_):
        ct = sealapi.Ciphertext(ctx)
        encryptor.encrypt_symmetric(pt_a, ct)

    ops["encrypt_pk_only"], ops_cpu["encrypt_pk_only"] = median_ms(enc_pk_only, reps)
    notes["encrypt_pk_only"] = "public-key Encryptor.encrypt of an already encoded plaintext"
    ops["encrypt_sk_only"], ops_cpu["encrypt_sk_only"] = median_ms(enc_sk_only, reps)
    notes["encrypt_sk_only"] = "secret-key Encryptor.encrypt_symmetric of an already encoded plaintext"

    ct_a = encrypt_vals(values_a)
    ct_b = encrypt_vals(values_b)

    def decrypt_only(ct):
        pt = sealapi.Plaintext()
        decryptor.decrypt(ct, pt)
        return pt

    ops["decrypt"], ops_cpu["decrypt"] = median_ms(lambda _: encoder.decode_double(decrypt_only(ct_a)), reps)
    notes["decrypt"] = f"Decryptor.decrypt of a fresh top-level ciphertext + CKKSEncoder.decode_double to {slots} Python floats"
    ops["decrypt_only"], ops_cpu["decrypt_only"] = median_ms(lambda _: decrypt_only(ct_a), reps)
    notes["decrypt_only"] = "Decryptor.decrypt of a fresh top-level ciphertext (no decode)"

    # sanity check: decryption is correct
    got = encoder.decode_double(decrypt_only(ct_a))
    err = max(abs(x - y) for x, y in zip(got[:slots], values_a))
    if err > 1e-3:
        sys.exit(f"seal_bench.py: SEAL round-trip error {err} too large")

    # One NTT of one limb, derived: SEAL transforms all 2 x limbs rows of a ciphertext.
    ct_t = encrypt_vals(values_a)
    samples = {"fwd": [], "inv": [], "fwd_cpu": [], "inv_cpu": []}
    for i in range(reps * 4 + 1):
        c0, t0 = time.process_time_ns(), time.perf_counter_ns()
        evaluator.transform_from_ntt_inplace(ct_t)
        c1, t1 = time.process_time_ns(), time.perf_counter_ns()
        evaluator.transform_to_ntt_inplace(ct_t)
        c2, t2 = time.process_time_ns(), time.perf_counter_ns()
        if i > 0:
            samples["inv"].append(t1 - t0)
            samples["fwd"].append(t2 - t1)
            samples["inv_cpu"].append(c1 - c0)
            samples["fwd_cpu"].append(c2 - c1)
    rows = 2 * (len(coeff_bits) - 1)
    per_row = {k: round(statistics.median(v) / 1e6 / rows, 5) for k, v in samples.items()}
    ops["ntt_one_limb"], ops_cpu["ntt_one_limb"] = per_row["fwd"], per_row["fwd_cpu"]
    ops["intt_one_limb"], ops_cpu["intt_one_limb"] = per_row["inv"], per_row["inv_cpu"]
    notes["ntt_one_limb"] = f"Evaluator.transform_to_ntt_inplace of a whole ciphertext / {rows} rows (one N-point NTT mod one prime)"
    notes["intt_one_limb"] = f"Evaluator.transform_from_ntt_inplace of a whole ciphertext / {rows} rows"

    def add(_):
        out = sealapi.Ciphertext(ctx)
        evaluator.add(ct_a, ct_b, out)

    ops["add"], ops_cpu["add"] = median_ms(add, reps)
    notes["add"] = "Evaluator.add of two fresh top-level ciphertexts into a new ciphertext"

    def encode_scalar():
        pt = sealapi.Plaintext()
        encoder.encode(scalar, scale, pt)
        return pt

    ops["encode_scalar"], ops_cpu["encode_scalar"] = median_ms(lambda _: encode_scalar(), reps)
    notes["encode_scalar"] = "CKKSEncoder.encode of one float (constant in all slots), no FFT"
    pt_s = encode_scalar()

    def mul_scalar(_):
        out = sealapi.Ciphertext(ctx)
        evaluator.multiply_plain(ct_a, pt_s, out)
        return out

    ops["mul_scalar"], ops_cpu["mul_scalar"] = median_ms(mul_scalar, reps)
    notes["mul_scalar"] = ("Evaluator.multiply_plain of a fresh top-level ciphertext by a pre-encoded constant "
                           "plaintext; NO rescale, no encode (see encode_scalar, mul_scalar_rescale)")

    def mul_scalar_rescale(_):
        out = mul_scalar(None)
        evaluator.rescale_to_next_inplace(out)

    ops["mul_scalar_rescale"], ops_cpu["mul_scalar_rescale"] = median_ms(mul_scalar_rescale, reps)
    notes["mul_scalar_rescale"] = "mul_scalar + Evaluator.rescale_to_next_inplace"

    def mul(_):
        out = sealapi.Ciphertext(ctx)
        evaluator.multiply(ct_a, ct_b, out)
        return out

    ops["mul"], ops_cpu["mul"] = median_ms(mul, reps)
    notes["mul"] = "Evaluator.multiply of two fresh top-level ciphertexts (tensor product, size-3 result; no relin, no rescale)"

    def relin(ct3):
        evaluator.relinearize_inplace(ct3, rk)

    ops["relin"], ops_cpu["relin"] = median_ms(relin, reps, setup=lambda: mul(None))
    notes["relin"] = "Evaluator.relinearize_inplace of a size-3 top-level ciphertext (key switching with the special prime)"

    def rescale(ct):
        evaluator.rescale_to_next_inplace(ct)

    def fresh_product():
        out = mul(None)
        evaluator.relinearize_inplace(out, rk)
        return out

    ops["rescale"], ops_cpu["rescale"] = median_ms(rescale, reps, setup=fresh_product)
    notes["rescale"] = "Evaluator.rescale_to_next_inplace of a size-2 top-level ciphertext (drops one limb)"

    def mul_relin_rescale(_):
        out = mul(None)
        evaluator.relinearize_inplace(out, rk)
        evaluator.rescale_to_next_inplace(out)

    ops["mul_relin_rescale"], ops_cpu["mul_relin_rescale"] = median_ms(mul_relin_rescale, reps)
    notes["mul_relin_rescale"] = "multiply + relinearize_inplace + rescale_to_next_inplace, fresh top-level inputs"

    # sanity check: product is correct
    out = mul(None)
    evaluator.relinearize_inplace(out, rk)
    evaluator.rescale_to_next_inplace(out)
    got = encoder.decode_double(decrypt_only(out))
    err = max(abs(x - a * b) for x, a, b in zip(got[:slots], values_a, values_b))
    if err > 1e-3:
        sys.exit(f"seal_bench.py: SEAL product error {err} too large")

    # ------------------------------------------------------------------ sizes
    # Keys named as in `beaa bench ckks` where the object is the same kind of thing.
    # SEAL's save() compresses with its default mode (zstd here: see "serialization_compression").
    ct_limbs = len(coeff_bits) - 1
    sym = encryptor.encrypt_symmetric(pt_a)  # Serializable: c1 replaced by a PRNG seed
    sizes["ciphertext_fresh_seeded"] = file_size(sym.save, ".ct")
    notes["ciphertext_fresh_seeded"] = "secret-key encryption saved as a SEAL Serializable (c0 + seed), zstd"
    sizes["ciphertext"] = file_size(ct_a.save, ".ct")
    notes["ciphertext"] = "Ciphertext.save of a full 2-poly top-level ciphertext (fresh, public-key), zstd"
    sizes["ciphertext_in_memory"] = 2 * n * ct_limbs * 8
    notes["ciphertext_in_memory"] = f"2 polys x N x {ct_limbs} limbs x 8 bytes"
    sizes["relin_key"] = file_size(kg.create_relin_keys().save, ".rk")
    notes["relin_key"] = ("KeyGenerator.create_relin_keys() Serializable (seeded: the uniform half of each "
                          f"of the {ct_limbs} key-switching components is a seed), zstd")
    sizes["relin_key_full"] = file_size(rk.save, ".rk")
    notes["relin_key_full"] = "RelinKeys.save of the full (non-seeded) relin keys, zstd"
    sizes["relin_key_in_memory"] = ct_limbs * 2 * n * len(coeff_bits) * 8
    notes["relin_key_in_memory"] = (f"{ct_limbs} components x 2 polys x N x {len(coeff_bits)} limbs "
                                    "(incl. the special prime) x 8 bytes")
    sizes["public_key"] = file_size(pk.save, ".pk")
    notes["public_key"] = ("PublicKey.save of the full public key, zstd (SEAL C++ can save it seeded, at about "
                           "half this size, via KeyGenerator.create_public_key(); the Python binding lacks that type)")

    # ------------------------------------------------------------------ TenSEAL API
    if not args.no_tenseal_ops:
        def ts_context(_=None):
            c = ts.context(ts.SCHEME_TYPE.CKKS, n, coeff_mod_bit_sizes=coeff_bits, n_threads=1)
            c.global_scale = scale
            return c

        ts_ops["keygen"], ts_ops_cpu["keygen"] = median_ms(ts_context, keygen_reps)
        notes["tenseal.keygen"] = ("ts.context(CKKS, n_threads=1): SEALContext creation (primes, NTT tables) + "
                                   "secret, public and relin keys (TenSEAL makes relin keys by default)")
        c = ts_context()
        assert c.has_relin_keys()
        ts_ops["encrypt"], ts_ops_cpu["encrypt"] = median_ms(lambda _: ts.ckks_vector(c, values_a), reps)
        notes["tenseal.encrypt"] = f"ts.ckks_vector of {slots} floats: list conversion + encode + public-key encrypt"
        va = ts.ckks_vector(c, values_a)
        vb = ts.ckks_vector(c, values_b)
        ts_ops["decrypt"], ts_ops_cpu["decrypt"] = median_ms(lambda _: va.decrypt(), reps)
        notes["tenseal.decrypt"] = "CKKSVector.decrypt(): decrypt + decode + conversion to a Python list"
        ts_ops["add"], ts_ops_cpu["add"] = median_ms(lambda _: va + vb, reps)
        notes["tenseal.add"] = "CKKSVector + CKKSVector (new vector: copy + Evaluator.add)"
        ts_ops["mul_scalar_rescale"], ts_ops_cpu["mul_scalar_rescale"] = median_ms(lambda _: va * scalar, reps)
        notes["tenseal.mul_scalar_rescale"] = "CKKSVector * float with auto_rescale: copy + encode constant + multiply_plain + rescale"
        ts_ops["mul_relin_rescale"], ts_ops_cpu["mul_relin_rescale"] = median_ms(lambda _: va * vb, reps)
        notes["tenseal.mul_relin_rescale"] = "CKKSVector * CKKSVector with auto_relin+auto_rescale: copy + multiply + relinearize + rescale"
        c.auto_rescale = False
        c.auto_relin = False
        c.auto_mod_switch = False
        ts_ops["mul_scalar"], ts_ops_cpu["mul_scalar"] = median_ms(lambda _: va * scalar, reps)
        notes["tenseal.mul_scalar"] = "CKKSVector * float with auto_rescale off: copy + encode constant + multiply_plain"
        ts_ops["mul"], ts_ops_cpu["mul"] = median_ms(lambda _: va * vb, reps)
        notes["tenseal.mul"] = "CKKSVector * CKKSVector with auto_relin/auto_rescale off: copy + multiply (size-3 result)"
        c.auto_rescale = True
        c.auto_relin = True
        c.auto_mod_switch = True

        sizes["tenseal_ciphertext_fresh"] = len(va.serialize())
        notes["tenseal_ciphertext_fresh"] = "CKKSVector.serialize() of a fresh vector (protobuf around SEAL's compressed ciphertext)"
        base = len(c.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False))
        with_rk = len(c.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=True))
        sizes["tenseal_context_params_only"] = base
        sizes["tenseal_relin_keys"] = with_rk - base
        notes["tenseal_relin_keys"] = "size(context with relin keys only) - size(context with no keys); not seeded"
        sizes["tenseal_public_key"] = len(c.serialize(save_public_key=True, save_secret_key=False,
                                                     save_galois_keys=False, save_relin_keys=False)) - base
        notes["tenseal_public_key"] = "size(context with public key only) - size(context with no keys); not seeded"
        sizes["tenseal_context_public"] = len(c.serialize(save_public_key=True, save_secret_key=False,
                                                         save_galois_keys=False, save_relin_keys=True))
        notes["tenseal_context_public"] = "Context.serialize with public + relin keys, no secret key"
        sizes["tenseal_context_with_secret"] = len(c.serialize(save_public_key=True, save_secret_key=True,
                                                              save_galois_keys=False, save_relin_keys=True))
        notes["tenseal_context_with_secret"] = ("Context.serialize(save_secret_key=True, save_public_key=True, "
                                               "save_relin_keys=True): TenSEAL then writes secret + public key only and "
                                               "re-creates relin keys on load, so this is SMALLER than tenseal_context_public")

    seal_version, compression = seal_header(ct_a.save)
    result = {
        "library": f"SEAL {seal_version} via TenSEAL {ts.__version__}",
        "seal_version": seal_version,
        "serialization_compression": compression,
        "n": n,
        "coeff_bits": coeff_bits,
        "limbs": ct_limbs,
        "key_limbs": len(coeff_bits),
        "log_q": sum(coeff_bits[:-1]),
        "log_qp": log_qp,
        "scale_bits": scale_bits,
        "slots": slots,
        "threads": 1,
        "reps": reps,
        "keygen_reps": keygen_reps,
        "ops_ms": ops,
        "ops_cpu_ms": ops_cpu,
        "tenseal_ops_ms": ts_ops,
        "tenseal_ops_cpu_ms": ts_ops_cpu,
        "sizes_bytes": sizes,
        "notes": notes,
    }
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
