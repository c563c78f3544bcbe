"""Check that a compiled bnfast extension runs on any x86-64 CPU.

Disassembles the extension (``objdump -d``) and fails if an instruction beyond baseline
x86-64 (SSE2) appears outside the kernel variants that are chosen at run time only when
the CPU has them.  Those variants are the functions whose names contain ``avx2`` or
``avx512`` (including the OpenMP-outlined ``*._omp_fn.N`` parts).  Everything else --
the dispatcher, the baseline kernels, the Cython bindings -- must use only SSE2, so that
importing bnfast and the baseline kernels work on any x86-64 CPU.  A build with
``-march=native`` (or ``-mavx2``) on an AVX machine fails this check.

Needs an unstripped extension (function names), e.g. the one in the wheel before
``auditwheel repair --strip``.

Usage: python tools/check_isa.py PATH/_core.*.so [...]
"""
import re
import subprocess
import sys

# VEX/EVEX-encoded instructions (AVX and later) start with "v"; BMI1/2, LZCNT, MOVBE,
# F16C and FMA have their own mnemonics.  Wide or mask registers mean AVX/AVX-512 too.
EXTENDED = re.compile(
    r"^(v[a-z0-9]+|andn|bextr|blsi|blsmsk|blsr|bzhi|mulx|pdep|pext|rorx|sarx|shlx|shrx"
    r"|lzcnt|tzcnt|movbe|kmov[bwdq]|kand[bwdq]?|kor[bwdq]?)$")
WIDE_REG = re.compile(r"%(ymm|zmm)\d+|%k[0-7]\b")
VARIANT = re.compile(r"avx2|avx512")


def scan(path):
    """Return ({function: [instructions]} outside the variants, number of variant functions)."""
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], check=True,
                         capture_output=True, text=True).stdout
    func, bad, variants = None, {}, set()
    for line in dis.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m:
            func = m.group(1)
            continue
        parts = line.split("\t")
        if func is None or len(parts) < 2:
            continue
        insn = parts[1].strip()
        mnemonic = insn.split()[0] if insn else ""
        if EXTENDED.match(mnemonic) or WIDE_REG.search(insn):
            if VARIANT.search(func):
                variants.add(func)
            else:
                bad.setdefault(func, []).append(insn)
    return bad, len(variants)


def main(paths):
    status = 0
    for path in paths:
        bad, nvar = scan(path)
        if bad:
            status = 1
            print(f"FAIL {path}: instructions beyond x86-64 baseline outside the "
                  f"run-time-dispatched variants:")
            for func, insns in sorted(bad.items()):
                print(f"  {func}: {len(insns)} e.g. {insns[0]}")
        elif nvar == 0:
            status = 1
            print(f"FAIL {path}: no AVX2/AVX-512 variant functions found "
                  "(stripped, or the variants were not compiled)")
        else:
            print(f"ok   {path}: AVX2/AVX-512 code only in {nvar} run-time-dispatched "
                  "variant functions; the rest is baseline x86-64")
    return status


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1:]))
