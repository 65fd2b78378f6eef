"""Triton kernels: the sm_90 NVFP4 grouped GEMM (`grouped_gemm_sm90`) and the FP4 decode bit
tricks it shares with its CPU model (`fp4_bits`, no Triton import: testable anywhere)."""
