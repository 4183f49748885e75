#include <gtest/gtest.h>

#include "kvbm/offload.h"

namespace kvbm {
namespace {

TEST(DiskAdmissionFilter, SecondSightAdmits) {
  DiskAdmissionFilter f;
  SequenceHash h(42);
  EXPECT_FALSE(f.SeeAndAdmit(h));
  EXPECT_EQ(f.Count(h), 1u);
  EXPECT_TRUE(f.SeeAndAdmit(h));
  EXPECT_EQ(f.Count(h), 2u);
  EXPECT_TRUE(f.SeeAndAdmit(h));
  EXPECT_EQ(f.Count(h), 4u);
}

TEST(DiskAdmissionFilter, DecayDecrementsAndPrunes) {
  auto now = std::chrono::steady_clock::time_point{};
  DiskAdmissionFilter f(std::chrono::seconds(600), 1000, [&] { return now; });
  SequenceHash a(1), b(2);
  f.SeeAndAdmit(a);
  f.SeeAndAdmit(b);
  f.SeeAndAdmit(b);  // b = 2
  now += std::chrono::seconds(600);
  EXPECT_FALSE(f.SeeAndAdmit(SequenceHash(3)));  // triggers decay: a -> 0 (pruned), b -> 1
  EXPECT_EQ(f.Count(a), 0u);
  EXPECT_EQ(f.Count(b), 1u);
  EXPECT_EQ(f.size(), 2u);
  EXPECT_FALSE(f.SeeAndAdmit(a));  // first sight again
}

TEST(DiskAdmissionFilter, BoundedEntries) {
  DiskAdmissionFilter f(std::chrono::seconds(600), 2);
  f.SeeAndAdmit(SequenceHash(1));
  f.SeeAndAdmit(SequenceHash(2));
  EXPECT_FALSE(f.SeeAndAdmit(SequenceHash(3)));
  EXPECT_FALSE(f.SeeAndAdmit(SequenceHash(3)));  // untracked: never admitted while full
  EXPECT_EQ(f.size(), 2u);
}

TEST(OffloadQueue, PriorityThenFifo) {
  OffloadQueue<int> q(10);
  q.Push(10, 1);
  q.Push(50, 2);
  q.Push(10, 3);
  q.Push(50, 4);
  EXPECT_EQ(*q.Pop(), 2);
  EXPECT_EQ(*q.Pop(), 4);
  EXPECT_EQ(*q.Pop(), 1);
  EXPECT_EQ(*q.Pop(), 3);
  EXPECT_FALSE(q.Pop().has_value());
  OffloadQueue<int> small(1);
  EXPECT_TRUE(small.Push(0, 1));
  EXPECT_FALSE(small.Push(0, 2));
}

}  // namespace
}  // namespace kvbm
