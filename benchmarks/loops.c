/*
 * Inner-loop microbenchmark: how fast one core runs the normalisation and statistics loops
 * in double precision, against float32 arithmetic and memcpy, on cache-resident data.
 * x86-64 with AVX-512 only (it is an analysis tool, not part of the package):
 *
 *     gcc -O2 benchmarks/loops.c -o /tmp/loops && /tmp/loops
 *
 * Figures are in benchmarks/README.md ("What is left is arithmetic").  Loops, each over
 * L elements: cur = bnfast's normalisation ((x - m) * a + b in double, 8 lanes); cur16 = the
 * same two vectors at a time; fma = with a fused multiply-add; cur256 = 4 lanes; f32 = a
 * float32 FMA (PyTorch's form); cvtonly = the conversions alone; mom/mom4/momfma = the
 * shifted-sums statistics loop (2 or 4 accumulators, with FMA); memcpy = the copy.
 */
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,fma,avx2")
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <string.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define L 16384  /* 64 KiB of float32 in and out: L2-resident */
float x[L] __attribute__((aligned(64))), y[L] __attribute__((aligned(64)));
__attribute__((noinline)) void cur(double m,double a,double b){__m512d mv=_mm512_set1_pd(m),av=_mm512_set1_pd(a),bv=_mm512_set1_pd(b);
 for(int i=0;i<L;i+=8){__m512d v=_mm512_cvtps_pd(_mm256_loadu_ps(x+i)); v=_mm512_add_pd(_mm512_mul_pd(_mm512_sub_pd(v,mv),av),bv); _mm256_storeu_ps(y+i,_mm512_cvtpd_ps(v));}}
__attribute__((noinline)) void cur16(double m,double a,double b){__m512d mv=_mm512_set1_pd(m),av=_mm512_set1_pd(a),bv=_mm512_set1_pd(b);
 for(int i=0;i<L;i+=16){__m512d v=_mm512_cvtps_pd(_mm256_loadu_ps(x+i)); __m512d w=_mm512_cvtps_pd(_mm256_loadu_ps(x+i+8)); v=_mm512_add_pd(_mm512_mul_pd(_mm512_sub_pd(v,mv),av),bv);w=_mm512_add_pd(_mm512_mul_pd(_mm512_sub_pd(w,mv),av),bv);
 _mm512_storeu_ps(y+i,_mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(v)),_mm512_cvtpd_ps(w),1));}}
__attribute__((noinline)) void fmav(double m,double a,double b){__m512d mv=_mm512_set1_pd(m),av=_mm512_set1_pd(a),bv=_mm512_set1_pd(b);
 for(int i=0;i<L;i+=8){__m512d v=_mm512_cvtps_pd(_mm256_loadu_ps(x+i)); v=_mm512_fmadd_pd(_mm512_sub_pd(v,mv),av,bv); _mm256_storeu_ps(y+i,_mm512_cvtpd_ps(v));}}
__attribute__((noinline)) void cur256(double m,double a,double b){__m256d mv=_mm256_set1_pd(m),av=_mm256_set1_pd(a),bv=_mm256_set1_pd(b);
 for(int i=0;i<L;i+=4){__m256d v=_mm256_cvtps_pd(_mm_loadu_ps(x+i)); v=_mm256_add_pd(_mm256_mul_pd(_mm256_sub_pd(v,mv),av),bv); _mm_storeu_ps(y+i,_mm256_cvtpd_ps(v));}}
__attribute__((noinline)) void f32(double m,double a,double b){__m512 av=_mm512_set1_ps(a),bv=_mm512_set1_ps(b-m*a);
 for(int i=0;i<L;i+=16){_mm512_storeu_ps(y+i,_mm512_fmadd_ps(_mm512_loadu_ps(x+i),av,bv));}}
__attribute__((noinline)) void cvtonly(double m,double a,double b){
 for(int i=0;i<L;i+=8){__m512d v=_mm512_cvtps_pd(_mm256_loadu_ps(x+i)); _mm256_storeu_ps(y+i,_mm512_cvtpd_ps(v));}}
__attribute__((noinline)) void mom(double m,double a,double b){__m512d kv=_mm512_set1_pd(m),s0=_mm512_setzero_pd(),s1=s0,q0=s0,q1=s0;
 for(int i=0;i<L;i+=16){__m512d d0=_mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x+i)),kv),d1=_mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x+i+8)),kv);s0=_mm512_add_pd(s0,d0);s1=_mm512_add_pd(s1,d1);q0=_mm512_add_pd(q0,_mm512_mul_pd(d0,d0));q1=_mm512_add_pd(q1,_mm512_mul_pd(d1,d1));}
 y[0]=_mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(s0,s1),_mm512_add_pd(q0,q1)));}
__attribute__((noinline)) void momfma(double m,double a,double b){__m512d kv=_mm512_set1_pd(m),s0=_mm512_setzero_pd(),s1=s0,q0=s0,q1=s0,s2=s0,s3=s0,q2=s0,q3=s0;
 for(int i=0;i<L;i+=32){__m512d d0=_mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x+i)),kv),d1=_mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x+i+8)),kv);
 __m512d d2=_mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x+i+16)),kv),d3=_mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x+i+24)),kv);
 s0=_mm512_add_pd(s0,d0);s1=_mm512_add_pd(s1,d1);q0=_mm512_fmadd_pd(d0,d0,q0);q1=_mm512_fmadd_pd(d1,d1,q1);
 s2=_mm512_add_pd(s2,d2);s3=_mm512_add_pd(s3,d3);q2=_mm512_fmadd_pd(d2,d2,q2);q3=_mm512_fmadd_pd(d3,d3,q3);}
 y[0]=_mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(s0,s1),_mm512_add_pd(q0,q1)))+_mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(s2,s3),_mm512_add_pd(q2,q3)));}
__attribute__((noinline)) void mom4(double m,double a,double b){__m512d kv=_mm512_set1_pd(m),s0=_mm512_setzero_pd(),s1=s0,q0=s0,q1=s0,s2=s0,s3=s0,q2=s0,q3=s0;
 for(int i=0;i<L;i+=32){__m512d d0=_mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x+i)),kv),d1=_mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x+i+8)),kv);
 __m512d d2=_mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x+i+16)),kv),d3=_mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x+i+24)),kv);
 s0=_mm512_add_pd(s0,d0);s1=_mm512_add_pd(s1,d1);q0=_mm512_add_pd(_mm512_mul_pd(d0,d0),q0);q1=_mm512_add_pd(_mm512_mul_pd(d1,d1),q1);
 s2=_mm512_add_pd(s2,d2);s3=_mm512_add_pd(s3,d3);q2=_mm512_add_pd(_mm512_mul_pd(d2,d2),q2);q3=_mm512_add_pd(_mm512_mul_pd(d3,d3),q3);}
 y[0]=_mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(s0,s1),_mm512_add_pd(q0,q1)))+_mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(s2,s3),_mm512_add_pd(q2,q3)));}
__attribute__((noinline)) void cpy(double m,double a,double b){memcpy(y,x,sizeof x);}
typedef void (*fn)(double,double,double);
int main(){for(int i=0;i<L;i++)x[i]=i*0.001f;
 struct{const char*n;fn f;}t[]={{"cur",cur},{"cur16",cur16},{"fma",fmav},{"cur256",cur256},{"f32",f32},{"cvtonly",cvtonly},{"mom",mom},{"mom4",mom4},{"momfma",momfma},{"memcpy",cpy}};
 for(int k=0;k<10;k++){int R=20000;double best=1e9;for(int rep=0;rep<5;rep++){double t0=now();for(int r=0;r<R;r++)t[k].f(0.5,1.3,0.1);double dt=now()-t0;if(dt<best)best=dt;}
 printf("%-8s %.2f Gel/s\n",t[k].n,(double)L*R/best/1e9);}}
