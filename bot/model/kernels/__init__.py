"""The compiled CPU kernels: build.py builds and loads them, layout.py holds the int4 weight layout they
read, ops.py the calls on tensors; the C++ beside them (int4_native.cpp dispatches to int4_avx512.h,
int4_amx.h and int4_avx2.h)."""
