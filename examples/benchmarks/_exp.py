import char_lm, torch, surgeon, time, sys
torch.set_num_threads(1)
d=char_lm.CharData()
arch=sys.argv[1]; steps=int(sys.argv[2]); lr=float(sys.argv[3])
for spec in sys.argv[4:]:
    m=char_lm.build(arch,d.vocab_size,0)
    opt=None
    if spec!="plain":
        spec_, _, k = spec.partition("|")
        surgeon.apply(m, spec_.split(";"), {"input_ids": d.batch(torch.Generator().manual_seed(99))[:, :-1]})
        from surgeon.nn import ADyT
        k, _, kf = k.partition("|")
        for name, mod in m.named_modules():
            if isinstance(mod, ADyT):
                final = ".h." not in name and ".layers." not in name
                f = kf if final else k
                if f: mod.alpha0.data *= float(f)
        opt=char_lm.make_optimizer(m,lr); surgeon.attach(m,opt)
    t=time.time(); r=char_lm.train(m,d,steps,0,lr=lr,optimizer=opt,eval_at=(steps//3,2*steps//3))
    print(arch, lr, spec, {k:round(v,3) for k,v in r.val.items()}, round(time.time()-t,1), flush=True)
