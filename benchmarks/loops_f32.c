/*
 * Inner-loop microbenchmark behind the float32 normalisation (benchmarks/README.md, item
 * 47): one core normalising L float32 elements with bnfast's float64 formula
 * ((x - m) * a + b in double, converted on load and store) against the float32 formula of
 * csrc/bn_elementwise.h (normalize_f32: (x - mh) * af + bf in float32; "f32": a test and
 * branch per vector for a non-finite lane, the kernel's in-place form; "defer": an OR per
 * vector and one test at the end, its form where y is not x; "avx512 zmm": 16 lanes, not
 * used), for each instruction set, and memcpy.  x86-64 with AVX-512 (an analysis tool, not part of the package):
 *
 *     gcc -O3 -ffp-contract=off -DL=16384 benchmarks/loops_f32.c -o /tmp/lf && /tmp/lf
 *
 * L = 4096 elements stays in L1, 65536 (256 KiB in, 256 KiB out) in L2.
 */
#include <immintrin.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#ifndef L
#define L 16384
#endif
float x[L] __attribute__((aligned(64))), y[L] __attribute__((aligned(64)));
__attribute__((noinline)) static void fix(float *yy, const float *xx, double m, double a, double b)
{for(int k=0;k<8;k++){float v=(float)(((double)xx[k]-m)*a+b); yy[k]=v==v?v:__builtin_nanf("");}}
__attribute__((noinline,target("sse2"))) void d_sse(double m,double a,double b){__m128d mv=_mm_set1_pd(m),av=_mm_set1_pd(a),bv=_mm_set1_pd(b);
 for(int i=0;i<L;i+=4){__m128 v=_mm_loadu_ps(x+i); __m128d lo=_mm_cvtps_pd(v), hi=_mm_cvtps_pd(_mm_movehl_ps(v,v));
 lo=_mm_add_pd(_mm_mul_pd(_mm_sub_pd(lo,mv),av),bv); hi=_mm_add_pd(_mm_mul_pd(_mm_sub_pd(hi,mv),av),bv);
 _mm_storeu_ps(y+i,_mm_movelh_ps(_mm_cvtpd_ps(lo),_mm_cvtpd_ps(hi)));}}
__attribute__((noinline,target("sse2"))) void f_sse(double m,double a,double b){float mh=(float)m;__m128 mv=_mm_set1_ps(mh),av=_mm_set1_ps((float)a),bv=_mm_set1_ps((float)(b-(m-mh)*a));
 for(int i=0;i<L;i+=8){__m128 v=_mm_loadu_ps(x+i),w=_mm_loadu_ps(x+i+4); v=_mm_add_ps(_mm_mul_ps(_mm_sub_ps(v,mv),av),bv);w=_mm_add_ps(_mm_mul_ps(_mm_sub_ps(w,mv),av),bv);
 if(__builtin_expect(_mm_movemask_ps(_mm_cmpunord_ps(_mm_sub_ps(v,v),_mm_sub_ps(w,w))),0)) fix(y+i,x+i,m,a,b); else {_mm_storeu_ps(y+i,v);_mm_storeu_ps(y+i+4,w);}}}
__attribute__((noinline,target("avx2"))) void d_avx2(double m,double a,double b){__m256d mv=_mm256_set1_pd(m),av=_mm256_set1_pd(a),bv=_mm256_set1_pd(b);
 for(int i=0;i<L;i+=8){__m256d lo=_mm256_cvtps_pd(_mm_loadu_ps(x+i)), hi=_mm256_cvtps_pd(_mm_loadu_ps(x+i+4));
 lo=_mm256_add_pd(_mm256_mul_pd(_mm256_sub_pd(lo,mv),av),bv); hi=_mm256_add_pd(_mm256_mul_pd(_mm256_sub_pd(hi,mv),av),bv);
 _mm256_storeu_ps(y+i,_mm256_insertf128_ps(_mm256_castps128_ps256(_mm256_cvtpd_ps(lo)),_mm256_cvtpd_ps(hi),1));}}
__attribute__((noinline,target("avx2"))) void f_avx2(double m,double a,double b){float mh=(float)m;__m256 mv=_mm256_set1_ps(mh),av=_mm256_set1_ps((float)a),bv=_mm256_set1_ps((float)(b-(m-mh)*a));
 for(int i=0;i<L;i+=8){__m256 v=_mm256_loadu_ps(x+i); v=_mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(v,mv),av),bv); __m256 u=_mm256_sub_ps(v,v);
 if(__builtin_expect(_mm256_movemask_ps(_mm256_cmp_ps(u,u,_CMP_UNORD_Q)),0)) fix(y+i,x+i,m,a,b); else _mm256_storeu_ps(y+i,v);}}
/* The kernel's "defer" form (y is not x): an OR of t - t per vector, one test at the end. */
__attribute__((noinline,target("avx2"))) void g_avx2(double m,double a,double b){float mh=(float)m;__m256 mv=_mm256_set1_ps(mh),av=_mm256_set1_ps((float)a),bv=_mm256_set1_ps((float)(b-(m-mh)*a)),acc=_mm256_setzero_ps();
 for(int i=0;i<L;i+=8){__m256 v=_mm256_loadu_ps(x+i); v=_mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(v,mv),av),bv); acc=_mm256_or_ps(acc,_mm256_sub_ps(v,v)); _mm256_storeu_ps(y+i,v);}
 if(_mm256_movemask_ps(_mm256_cmp_ps(acc,acc,_CMP_UNORD_Q))) for(int i=0;i<L;i+=8) fix(y+i,x+i,m,a,b);}
__attribute__((noinline,target("sse2"))) void g_sse(double m,double a,double b){float mh=(float)m;__m128 mv=_mm_set1_ps(mh),av=_mm_set1_ps((float)a),bv=_mm_set1_ps((float)(b-(m-mh)*a)),acc=_mm_setzero_ps();
 for(int i=0;i<L;i+=8){__m128 v=_mm_loadu_ps(x+i),w=_mm_loadu_ps(x+i+4); v=_mm_add_ps(_mm_mul_ps(_mm_sub_ps(v,mv),av),bv); w=_mm_add_ps(_mm_mul_ps(_mm_sub_ps(w,mv),av),bv);
 acc=_mm_or_ps(acc,_mm_or_ps(_mm_sub_ps(v,v),_mm_sub_ps(w,w))); _mm_storeu_ps(y+i,v); _mm_storeu_ps(y+i+4,w);}
 if(_mm_movemask_ps(_mm_cmpunord_ps(acc,acc))) for(int i=0;i<L;i+=8) fix(y+i,x+i,m,a,b);}
__attribute__((noinline,target("avx512f,avx512vl,avx512dq"))) void d_avx512(double m,double a,double b){__m512d mv=_mm512_set1_pd(m),av=_mm512_set1_pd(a),bv=_mm512_set1_pd(b);
 for(int i=0;i<L;i+=8){__m512d v=_mm512_cvtps_pd(_mm256_loadu_ps(x+i)); v=_mm512_add_pd(_mm512_mul_pd(_mm512_sub_pd(v,mv),av),bv); _mm256_storeu_ps(y+i,_mm512_cvtpd_ps(v));}}
__attribute__((noinline,target("avx512f,avx512vl,avx512dq"))) void g_avx512(double m,double a,double b){g_avx2(m,a,b);}  /* the kernel uses the 256-bit form */
__attribute__((noinline,target("avx512f,avx512vl,avx512dq"))) void z_avx512(double m,double a,double b){float mh=(float)m;__m512 mv=_mm512_set1_ps(mh),av=_mm512_set1_ps((float)a),bv=_mm512_set1_ps((float)(b-(m-mh)*a)),acc=_mm512_setzero_ps();
 for(int i=0;i<L;i+=16){__m512 v=_mm512_loadu_ps(x+i); v=_mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(v,mv),av),bv); acc=_mm512_or_ps(acc,_mm512_sub_ps(v,v)); _mm512_storeu_ps(y+i,v);}
 if(_mm512_cmp_ps_mask(acc,acc,_CMP_UNORD_Q)) for(int i=0;i<L;i+=8) fix(y+i,x+i,m,a,b);}
void cpy(double m,double a,double b){(void)m;(void)a;(void)b;memcpy(y,x,sizeof x);}
typedef void (*fn)(double,double,double);
int main(){for(int i=0;i<L;i++)x[i]=i*0.001f;
 struct{const char*n;fn f;}t[]={{"sse2 f64",d_sse},{"sse2 f32",f_sse},{"sse2 defer",g_sse},{"avx2 f64",d_avx2},{"avx2 f32",f_avx2},{"avx2 defer",g_avx2},{"avx512 f64",d_avx512},{"avx512 defer",g_avx512},{"avx512 zmm",z_avx512},{"memcpy",cpy}};
 for(int k=0;k<(int)(sizeof t/sizeof t[0]);k++){int R=(int)(2e8/L);double best=1e9;for(int rep=0;rep<7;rep++){double t0=now();for(int r=0;r<R;r++)t[k].f(0.5,1.3,0.1);double dt=now()-t0;if(dt<best)best=dt;}
 printf("%-11s %.2f G elements/s\n",t[k].n,(double)L*R/best/1e9);}}
