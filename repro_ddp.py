import sys
from benchmarks.overhead import measure_ddp, OverheadConfig
if __name__ == "__main__":
    n = int(sys.argv[1]); acc = int(sys.argv[2])
    for i in range(n):
        r = measure_ddp(OverheadConfig("digits", 32, acc, 2), 100, 10)
        print(i, round(r.ratio, 3), flush=True)
